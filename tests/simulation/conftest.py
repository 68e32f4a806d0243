"""The chain tests' fixtures (tests/chain/conftest.py), for comparing the model with the contracts.

`chain_env` is the embedded (eth-tester) deployment, isolated per test.
"""

from __future__ import annotations

from chain.conftest import chain_env as chain_env
from chain.conftest import embedded_env as embedded_env
