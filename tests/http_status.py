"""`python tests/http_status.py URL [--post]`: print `HTTP <status>` of a request without credentials; exit 0 when
the server answered at all (any status), 1 when nothing answered (shell loops wait on it)."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request


def status(url: str, post: bool) -> int | None:
    """The HTTP status `url` answers (a POST of an empty JSON job when `post`), or None when nothing answers."""
    request = urllib.request.Request(url, data=b"{}" if post else None, method="POST" if post else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return None


if __name__ == "__main__":
    code = status(sys.argv[1], "--post" in sys.argv[2:])
    print(f"HTTP {code}" if code is not None else "no answer", flush=True)
    sys.exit(0 if code is not None else 1)
