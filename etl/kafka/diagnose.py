"""Why a Kafka connection failed, said once for every command (``run``, ``check``, ``status``).

kafka-python only says "Unable to bootstrap", after its whole bootstrap wait. What went wrong is in
its own log lines, or is found faster by doing the client's first steps ourselves: a TCP connect, a
TLS handshake with the same files, one request over it (a broker that requires a client certificate
says so only then). A refused certificate, host name, client certificate or password is the
operator's to fix, so it is a :class:`~etl.errors.ConfigError` on the first attempt, whatever the
retry deadline; only a broker that does not answer is a :class:`~etl.errors.TransientError`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from etl.errors import ConfigError, EtlError, TransientError

if TYPE_CHECKING:
    from etl.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

CLIENT_CERT_HINT = "the broker asks for a client certificate: set ssl_certfile and ssl_keyfile"
# The loggers whose DEBUG lines show a SASL exchange (request sent, answer or none).
_SASL_LOGGERS = ("kafka.protocol.parser",)


class ClientLog(logging.Handler):
    """Collects the Kafka client's own lines while connecting, without printing them.

    ``last`` is the last error line; ``lines`` every error line; ``sasl_dropped`` counts connections the
    broker closed right after the client sent its SASL credentials, with no answer: how a broker
    refuses a password on the attempts where the client does not read its error message.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last: str | None = None
        self.lines: list[str] = []
        self.sasl_dropped = 0
        self._authenticating = False

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a malformed log call must not break the diagnosis
            message = record.getMessage()
            if "Sending request" in message and "SaslAuthenticateRequest" in message:
                self._authenticating = True
            elif "Received response" in message:
                self._authenticating = False
            if record.levelno < logging.ERROR:
                return
            if self._authenticating and "disconnected" in message:
                self.sasl_dropped += 1
                self._authenticating = False
            self.last = message.split(": ", 1)[-1][:300]
            self.lines.append(message)

    def __enter__(self) -> ClientLog:
        kafka_log = logging.getLogger("kafka")
        self._saved = (kafka_log.level, kafka_log.propagate)
        if kafka_log.getEffectiveLevel() > logging.ERROR:
            # See the client's errors without printing them: the job reports the cause itself.
            kafka_log.setLevel(logging.ERROR)
            kafka_log.propagate = False
        kafka_log.addHandler(self)
        # The SASL exchange's DEBUG lines (a handful per attempt), seen here only unless -vv shows them.
        self._sasl: list[tuple[logging.Logger, int, bool]] = []
        for name in _SASL_LOGGERS:
            logger = logging.getLogger(name)
            if logger.getEffectiveLevel() > logging.DEBUG:
                self._sasl.append((logger, logger.level, logger.propagate))
                logger.setLevel(logging.DEBUG)
                logger.propagate = False
                logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        kafka_log = logging.getLogger("kafka")
        kafka_log.removeHandler(self)
        level, kafka_log.propagate = self._saved
        # setLevel, not `.level =`: it also clears the loggers' cached isEnabledFor answers, which
        # would otherwise keep the client's ERROR lines (kafka.conn...) enabled at default verbosity.
        kafka_log.setLevel(level)
        for logger, level, propagate in self._sasl:
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate


def connect(
    settings: Settings,
    make: Callable[[int], T],
    *,
    deadline_s: float,
    attempt_s: float = 5.0,
    retry_log: Callable[[str, float], None] | None = None,
) -> T:
    """``make(bootstrap_timeout_ms)`` (a consumer, an admin client), with the cause of a failure named.

    Retries only what may pass (no broker answering) until ``deadline_s``; a TLS, client certificate
    or SASL refusal raises ConfigError at once. ``retry_log(reason, delay)`` is called before a retry.
    """
    deadline = time.monotonic() + deadline_s
    delay = 0.5
    while True:
        remaining = deadline - time.monotonic()
        server: tuple[str, int] | None = None
        unreachable: TransientError | None = None
        try:
            server = tcp_probe(settings, min(max(remaining, 1.0), 5.0))
        except TransientError as exc:
            unreachable = exc  # the client still tries: its own lines may say more (-vv)
        if server is not None and "SSL" in settings.security_protocol:
            tls_probe(settings, server, min(max(remaining, 1.0), 5.0))  # raises ConfigError
        with ClientLog() as seen:
            try:
                return make(int(max(min(attempt_s, remaining), 2.0) * 1000))
            except Exception as exc:
                import kafka.errors as kerr

                if isinstance(exc, kerr.KafkaConfigurationError):
                    raise ConfigError(f"Kafka client settings: {exc}") from None
                if not isinstance(exc, (kerr.KafkaError, OSError)):
                    raise
                error = diagnose(settings, exc, seen, server)
        if isinstance(error, ConfigError):
            raise error
        error = unreachable or error
        if time.monotonic() + delay > deadline:
            raise error
        if retry_log is not None:
            retry_log(str(error), delay)
        time.sleep(delay)
        delay = min(delay * 2, 10)


def diagnose(
    settings: Settings, exc: BaseException, seen: ClientLog, server: tuple[str, int] | None = None
) -> EtlError:
    """Name the cause of a failed Kafka bootstrap from the client's own lines."""
    text = " | ".join([*seen.lines, str(exc)])
    lower = text.lower()
    protocol = settings.security_protocol
    servers = settings.bootstrap_servers
    sasl_refused = "saslauthentication" in lower or "authentication failed" in lower
    # Two drops, not one: a broker that restarts mid-exchange drops a connection once.
    if sasl_refused or (protocol.startswith("SASL") and seen.sasl_dropped >= 2):
        how = "refused" if sasl_refused else "closed the connection after the SASL credentials were sent"
        return ConfigError(
            f"Kafka at {servers}: SASL authentication failed for user {settings.sasl_username!r} "
            f"with {settings.sasl_mechanism} (the broker {how})",
            hint="check sasl_username, METRIC_ETL_SASL_PASSWORD and sasl_mechanism (the broker's "
            "enabled mechanisms)",
        )
    if "unsupportedsaslmechanism" in lower or "unsupported sasl mechanism" in lower:
        return ConfigError(
            f"Kafka at {servers}: the broker does not enable SASL mechanism {settings.sasl_mechanism}",
            hint="set sasl_mechanism to one the broker enables (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)",
        )
    if "hostname mismatch" in lower or "doesn't match" in lower or "ip address mismatch" in lower:
        return ConfigError(
            f"TLS to Kafka at {servers}: the broker certificate does not name this host "
            f"({_tls_reason(text)})",
            hint="connect with the host name in the broker certificate, or set ssl_check_hostname false",
        )
    if "certificate_verify_failed" in lower or "certificate verify failed" in lower:
        return ConfigError(
            f"TLS to Kafka at {servers}: the broker certificate is not trusted ({_tls_reason(text)})",
            hint="set ssl_cafile to the CA bundle that signed the broker certificate",
        )
    if "certificate_required" in lower or "certificate required" in lower:
        return ConfigError(f"TLS to Kafka at {servers}: {CLIENT_CERT_HINT}", hint=CLIENT_CERT_HINT)
    if "SSL" in protocol and (
        "wrong_version_number" in lower or "unexpected_eof" in lower or "eof occurred" in lower
    ):
        return ConfigError(
            f"TLS to Kafka at {servers}: the port does not speak TLS",
            hint=f"use the broker's TLS listener with security_protocol {protocol}, or "
            "security_protocol PLAINTEXT / SASL_PLAINTEXT for this port",
        )
    if server is not None and "SSL" not in protocol and speaks_tls(server, 5.0):
        return ConfigError(
            f"Kafka at {server[0]}:{server[1]}: the port speaks TLS, but security_protocol is {protocol}",
            hint="set security_protocol to SSL or SASL_SSL (with ssl_cafile) for this port, "
            "or use the broker's plain listener",
        )
    detail = seen.last or str(exc)
    hint = "is the broker healthy, and is bootstrap_servers the listener for that security_protocol?"
    return TransientError(
        f"Kafka at {servers} did not answer the {protocol} handshake: {_first_line(detail)[:300]}",
        stage="Kafka",
        hint=hint,
    )


def _tls_reason(text: str) -> str:
    marker = text.lower().find("certificate verify failed")
    if marker < 0:
        return "handshake failed"
    return text[marker:].split("(_ssl", 1)[0].split("|", 1)[0].strip()


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def tcp_probe(settings: Settings, timeout_s: float) -> tuple[str, int]:
    """The first bootstrap server that accepts a TCP connection; fails fast, and clearly, if none."""
    problems = []
    for server in settings.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        address = (host.strip("[]"), int(port))
        try:
            socket.create_connection(address, timeout=timeout_s).close()
            return address
        except OSError as exc:
            problems.append(f"{server.strip()}: {exc.strerror or exc}")
    raise TransientError(
        f"cannot connect to Kafka ({'; '.join(problems)})",
        stage="Kafka",
        hint="is the broker up, and is bootstrap_servers the listener for "
        f"security_protocol {settings.security_protocol}?",
    )


# ApiVersions v0, correlation id 1, client id "metric-etl": the first request any Kafka client sends
# (allowed before SASL). A broker that requires a client certificate refuses it with a TLS alert.
_CLIENT_ID = b"metric-etl"
_API_VERSIONS = struct.pack(">hhih", 18, 0, 1, len(_CLIENT_ID)) + _CLIENT_ID
_API_VERSIONS = struct.pack(">i", len(_API_VERSIONS)) + _API_VERSIONS


def tls_probe(settings: Settings, server: tuple[str, int], timeout_s: float) -> None:
    """A TLS handshake and one request as the Kafka client will do them; ConfigError naming what is
    wrong (the broker certificate, the host name, the client certificate or its key)."""
    import ssl

    where = f"TLS to Kafka at {server[0]}:{server[1]}"
    context = ssl.create_default_context(cafile=settings.ssl_cafile)
    context.check_hostname = settings.ssl_check_hostname
    if settings.ssl_certfile:
        try:
            context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile, settings.ssl_key_password)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{where}: cannot load the client certificate {settings.ssl_certfile} with key "
                f"{settings.ssl_keyfile} ({getattr(exc, 'reason', None) or exc})",
                hint="an encrypted key needs its passphrase in METRIC_ETL_SSL_KEY_PASSWORD (or "
                "ssl_key_password_file); the key must belong to the certificate",
            ) from None
    try:
        with (
            socket.create_connection(server, timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=server[0]) as tls,
        ):
            # TLS 1.3: the broker checks the client certificate after the handshake, and says so
            # only when the client first reads.
            tls.sendall(_API_VERSIONS)
            tls.recv(4)
            return
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or str(exc)
        if "hostname" in reason.lower() or "ip address mismatch" in reason.lower():
            raise ConfigError(
                f"{where}: the broker certificate does not name this host ({reason})",
                hint="connect with a host name the certificate names, or set ssl_check_hostname false",
            ) from None
        raise ConfigError(
            f"{where}: the broker certificate is not trusted ({reason})",
            hint="set ssl_cafile to the CA bundle that signed the broker certificate",
        ) from None
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc)
        if reason in ("WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING", "RECORD_LAYER_FAILURE"):
            raise ConfigError(
                f"{where}: the port does not speak TLS ({reason})",
                hint=f"use the broker's TLS listener with security_protocol {settings.security_protocol}, "
                "or security_protocol PLAINTEXT / SASL_PLAINTEXT for this port",
            ) from None
        if not settings.ssl_certfile and (
            "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason or "BAD_CERTIFICATE" in reason
        ):
            raise ConfigError(f"{where}: {CLIENT_CERT_HINT} ({reason})", hint=CLIENT_CERT_HINT) from None
        if "ALERT" in reason or "certificate" in str(exc).lower():
            raise ConfigError(
                f"{where}: the broker refused the handshake ({reason})",
                hint="the broker may not trust the client certificate: it must be signed by a CA the "
                "broker trusts (ssl.truststore of its listener)",
            ) from None
        # Anything else: let the Kafka client try, and diagnose from what it logs.
    except OSError:
        pass  # e.g. EOF without a TLS alert, or a timeout: the client's own attempt will tell more


def speaks_tls(server: tuple[str, int], timeout_s: float) -> bool:
    """True when a TLS handshake (without verification) succeeds: a TLS port given a plain client."""
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection(server, timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=server[0]),
        ):
            return True
    except OSError:
        return False
