"""cc50tw: LLM token streams over the CC50 binary protocol, served by Twisted."""

__version__ = "0.1.0"
