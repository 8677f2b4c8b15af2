"""Integration tests: real twistd cc50 processes over real sockets (pytest + pytest-twisted)."""
