"""Makes ``twistd cc50`` exist once cc50tw is installed."""

from twisted.application.service import ServiceMaker

cc50 = ServiceMaker(
    "cc50",
    "cc50tw.tap",
    "Serve LLM token streams over the CC50 binary protocol",
    "cc50",
)

# ``mtls:`` endpoint strings (TLS with required client certificates).
from cc50tw.tls import mutualTLS  # noqa: E402,F401
