"""Errors meant for the user: the CLI prints their message on one line and exits non-zero."""


class UserError(Exception):
    """Something the user can fix (a path, a column, a flag). The message says what to do."""

    exit_code = 2


# --- secrets inside URLs ---------------------------------------------------------------------
# Endpoints may carry credentials (`http://user:SECRET@host/v1`, `…/v1?api-key=SECRET`). Only
# the sanitized form is ever stored (run dir, submission records, pickles) or shown; the full
# URL lives in the environment of the processes that need it (ENDPOINT_ENV).
ENDPOINT_ENV = "CAPSFUS_ENDPOINT_URL"
_PUBLIC_QUERY = ("api-version",)


def sanitize_url(url: str) -> str:
    """The URL without credentials (user:pass@, query values but api-version), for records."""
    from urllib.parse import parse_qs, urlsplit, urlunsplit
    p = urlsplit(url)
    # removed credentials stay visible as "…@", so a reader (and `runtime_endpoint`) knows the
    # real URL had some
    netloc = ("…@" if p.username or p.password else "") + (p.hostname or "")
    if p.port:
        netloc += f":{p.port}"
    q = "&".join(f"{k}={v[0] if k.lower() in _PUBLIC_QUERY else '…'}"
                 for k, v in parse_qs(p.query).items())
    return urlunsplit((p.scheme, netloc, p.path, q, ""))


def url_secrets(url: str | None) -> list[str]:
    """The parts of ``url`` that ``sanitize_url`` removes, to redact them from any text."""
    from urllib.parse import parse_qs, unquote, urlsplit
    if not url:
        return []
    p = urlsplit(url)
    out = [p.username, p.password] + [v for k, vs in parse_qs(p.query).items()
                                      if k.lower() not in _PUBLIC_QUERY for v in vs]
    secrets = {s for s in out if s and len(s) >= 3}
    secrets |= {unquote(s) for s in secrets}
    return sorted(secrets, key=len, reverse=True)


def redact_url(text: str, url: str | None) -> str:
    """``text`` with ``url`` shown sanitized and its secrets (also alone) redacted."""
    if not url:
        return text
    text = text.replace(url, sanitize_url(url))
    for s in url_secrets(url):
        text = text.replace(s, "[redacted]")
    return text
