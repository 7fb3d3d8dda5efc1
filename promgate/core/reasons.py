"""The reason vocabulary: every ``reason`` an audit record can carry, which is also every
``reason`` label of promgate's metrics.

One enum, so that a misspelt reason is a type error rather than a new label. Members are
strings (``StrEnum``): they compare equal to, format as and JSON-encode as their values,
which are the documented audit schema (docs/audit.md) and never change.
"""

from __future__ import annotations

from enum import StrEnum, unique


@unique
class Reason(StrEnum):
    """Why a request, connection or handshake ended the way it did."""

    # -- allowed and answered ------------------------------------------------------------------
    OK = "ok"

    # -- the request itself ----------------------------------------------------------------------
    BAD_REQUEST = "bad_request"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TIMEOUT = "request_timeout"
    CLIENT_CLOSED_MID_REQUEST = "client_closed_mid_request"

    # -- who is asking ---------------------------------------------------------------------------
    NO_CREDENTIALS = "no_credentials"
    UNKNOWN_IDENTITY = "unknown_identity"
    IDENTITY_AMBIGUOUS = "identity_ambiguous"
    AUTHN_MISSING = "authn_missing"
    AUTHN_FAILED = "authn_failed"
    AUTHN_CONFLICT = "authn_conflict"
    AUTH_THROTTLED = "auth_throttled"
    AUTH_OVERLOADED = "auth_overloaded"
    AUTHN_PENDING = "authn_pending"

    # -- policy ----------------------------------------------------------------------------------
    NOT_FOUND = "not_found"
    AUTHZ_DENIED = "authz_denied"
    PATH_REFUSED = "path_refused"
    PARAM_REFUSED = "param_refused"
    NO_SERVER_NAME = "no_server_name"
    UNKNOWN_SERVER_NAME = "unknown_server_name"

    # -- limits and the audit log ----------------------------------------------------------------
    RATE_LIMITED = "rate_limited"
    CONCURRENCY_LIMITED = "concurrency_limited"
    AUDIT_UNAVAILABLE = "audit_unavailable"
    #: ``shared_limits`` with ``on_unavailable: deny``, and Redis did not answer in time.
    LIMITS_UNAVAILABLE = "limits_unavailable"

    # -- the upstream ----------------------------------------------------------------------------
    UPSTREAM_REFUSED = "upstream_refused"
    UPSTREAM_TLS_FAILED = "upstream_tls_failed"
    UPSTREAM_RESET = "upstream_reset"
    UPSTREAM_MALFORMED = "upstream_malformed"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_CLOSED = "upstream_closed"
    RESPONSE_TOO_LARGE = "response_too_large"

    # -- how a connection or tunnel ended --------------------------------------------------------
    CLIENT_ABORTED = "client_aborted"
    CLIENT_CLOSED = "client_closed"
    CLIENT_BUFFER_OVERFLOW = "client_buffer_overflow"
    IDLE_TIMEOUT = "idle_timeout"
    TUNNEL_IDLE_TIMEOUT = "tunnel_idle_timeout"
    GATEWAY_SHUTDOWN = "gateway_shutdown"
    #: A reload's policy no longer allows an open tunnel or tcp connection.
    POLICY_REVOKED = "policy_revoked"

    # -- TLS handshakes --------------------------------------------------------------------------
    NO_CLIENT_CERTIFICATE = "no_client_certificate"
    UNKNOWN_CA = "unknown_ca"
    CERTIFICATE_EXPIRED = "certificate_expired"
    CERTIFICATE_NOT_YET_VALID = "certificate_not_yet_valid"
    CERTIFICATE_PURPOSE = "certificate_purpose"
    CERTIFICATE_REVOKED = "certificate_revoked"
    CRL_UNAVAILABLE = "crl_unavailable"
    CERTIFICATE_INVALID = "certificate_invalid"
    PROTOCOL_VERSION = "protocol_version"
    NO_SHARED_CIPHER = "no_shared_cipher"
    PLAIN_HTTP = "plain_http"
    ALPN_MISMATCH = "alpn_mismatch"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    CLOSED_BEFORE_HANDSHAKE = "closed_before_handshake"
    HANDSHAKE_ERROR = "handshake_error"

    # -- the first bytes of a passthrough connection ---------------------------------------------
    NOT_TLS = "not_tls"
    SSLV2 = "sslv2"
    MALFORMED_CLIENT_HELLO = "malformed_client_hello"
    BAD_SERVER_NAME = "bad_server_name"
    CLIENT_HELLO_TOO_LARGE = "client_hello_too_large"
    CLIENT_HELLO_TRUNCATED = "client_hello_truncated"
    CLOSED_BEFORE_CLIENT_HELLO = "closed_before_client_hello"
    CLIENT_HELLO_TIMEOUT = "client_hello_timeout"

    # -- the gateway's own life ------------------------------------------------------------------
    #: A reload refused: the new configuration is not valid, or needs a restart.
    CONFIG_INVALID = "config_invalid"


__all__ = ["Reason"]
