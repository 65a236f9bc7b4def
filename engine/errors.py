"""The engine's exceptions: one root, two branches that decide how an enrollment ends.

`RejectedError`: a policy said no; the enrollment ends *rejected* with the error's `reason`.
`FailedError`: something went wrong; the enrollment ends *failed* with the error's type name.
Subclasses carry the data a caller needs (`device_id`, `offset`, ...).
"""

from __future__ import annotations


class EnrollmentError(Exception):
    """Root of every error the engine raises on purpose."""

    reason = "error"


class RejectedError(EnrollmentError):
    """A policy refused the enrollment."""

    reason = "rejected"


class FailedError(EnrollmentError):
    """The enrollment could not complete."""

    reason = "failed"


class MalformedDerError(FailedError):
    """Bytes that should be DER are truncated, garbage or not the expected structure."""

    reason = "malformed-der"

    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(f"{message} (at byte {offset})")
        self.detail = message
        self.offset = offset


class MalformedRequestError(MalformedDerError):
    """A PKCS #10 request that is not strict DER (RFC 2986, X.690); `offset` is where it breaks.

    The C and the Python request walks raise it with the same message at the same offset.
    """

    reason = "malformed-request"


class AuthenticationError(RejectedError):
    """The login does not match the user's stored verifier, or the user is unknown."""

    reason = "wrong-credentials"

    def __init__(self, user_id: str) -> None:
        super().__init__(f"authentication failed for user {user_id!r}")
        self.user_id = user_id


class UnknownUserError(RejectedError):
    """The messaging directory has no entry for the user."""

    reason = "unknown-user"

    def __init__(self, user_id: str) -> None:
        super().__init__(f"no directory entry for user {user_id!r}")
        self.user_id = user_id


class UnknownProfileError(RejectedError):
    """The request names a CA profile ID that no CA serves."""

    reason = "unknown-ca-profile"

    def __init__(self, profile_id: str) -> None:
        super().__init__(f"unknown CA profile ID {profile_id!r}")
        self.profile_id = profile_id


class UnsupportedKeyError(RejectedError):
    """The key type, curve or signature algorithm is not one this CA accepts."""

    reason = "unsupported-key"


class WeakKeyError(RejectedError):
    """An RSA key below the profile's minimum size (never below 2048 bits)."""

    reason = "weak-key"

    def __init__(self, bits: int, minimum: int) -> None:
        super().__init__(f"RSA key of {bits} bits is below the minimum of {minimum}")
        self.bits = bits
        self.minimum = minimum


class SignatureInvalidError(RejectedError):
    """The request's signature does not verify with its own public key (no proof of possession)."""

    reason = "bad-signature"


class SubjectMismatchError(RejectedError):
    """The request's subject is not the DN the enterprise server looked up."""

    reason = "subject-mismatch"

    def __init__(self, expected: str, found: str) -> None:
        super().__init__(f"subject {found!r} is not the looked-up DN {expected!r}")
        self.expected = expected
        self.found = found


class SanNotAllowedError(RejectedError):
    """The request asks for a subject alternative name the user may not have."""

    reason = "san-not-allowed"


class SanInvalidError(RejectedError):
    """The request's subjectAltName is one a CA must not issue (RFC 5280 4.2.1.6)."""

    reason = "san-invalid"


class EmptySanError(SanInvalidError):
    """The request asks for a subjectAltName with no names (GeneralNames is SIZE (1..MAX))."""

    reason = "san-empty"


class DuplicateSanError(SanInvalidError):
    """The request's subjectAltName names the same entry twice."""

    reason = "san-duplicate"


class DuplicateSerialError(FailedError):
    """A store already holds a certificate with this serial (RFC 5280 4.1.2.2: serials are unique).

    Raised by a directory's `publish`; the CA draws a fresh serial and issues again.
    """

    reason = "duplicate-serial"

    def __init__(self, serial: int) -> None:
        super().__init__(f"serial {serial:x} is already published")
        self.serial = serial


class ApprovalDeniedError(RejectedError):
    """A CA administrator rejected the request."""

    reason = "administrator-rejected"

    def __init__(self, device_id: str, administrator: int) -> None:
        super().__init__(f"administrator {administrator} rejected the request of {device_id!r}")
        self.device_id = device_id
        self.administrator = administrator


class KeyMismatchError(RejectedError):
    """The certificate's public key is not the one stored for the device (RFC 5280 4.1.2.7)."""

    reason = "key-mismatch"

    def __init__(self, device_id: str) -> None:
        super().__init__(f"certificate public key does not match the key stored for {device_id!r}")
        self.device_id = device_id


class CertificateNotFoundError(FailedError):
    """The directory has no certificate where the CA said it published one."""

    reason = "certificate-not-found"

    def __init__(self, dn: str, serial: int) -> None:
        super().__init__(f"no certificate with serial {serial:x} published for {dn!r}")
        self.dn = dn
        self.serial = serial


class ChainFetchError(FailedError):
    """The CA chain could not be fetched for a profile."""

    reason = "chain-fetch-failed"


class WireError(FailedError):
    """A target over the wire did not give a usable answer; the subclass says how."""

    reason = "wire-error"


class TargetUnavailableError(WireError):
    """The connection to the target was refused or could not be made."""

    reason = "target-unavailable"


class TargetTimeoutError(WireError):
    """The target did not answer in time (connect, TLS handshake, or the answer)."""

    reason = "target-timeout"


class ConnectionLostError(WireError):
    """The target closed or reset the connection before its answer was complete."""

    reason = "connection-lost"


class MalformedAnswerError(WireError):
    """The target's answer is not valid HTTP or not the protocol's message."""

    reason = "malformed-answer"


class HttpStatusError(WireError):
    """The target answered with an HTTP status the protocol does not expect."""

    reason = "http-status"

    def __init__(self, status: int, what: str) -> None:
        super().__init__(f"{what}: HTTP status {status}")
        self.status = status


class ProtocolRefusedError(RejectedError):
    """The target's protocol answer refused the enrollment (EST 4xx, SCEP FAILURE)."""

    reason = "refused-by-target"

    def __init__(self, what: str) -> None:
        super().__init__(what)
