"""What the tests share: real servers and processes (`procs`), media and scoring helpers (`media`),
config writers (`configs`) and the TLS material of the MQTT security tests (`tls`). Fixtures built
from these live in `tests/conftest.py`; no test module imports another."""
