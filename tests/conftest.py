"""Shared test set-up.

Eight simulated CPU devices let the sharding tests build real meshes on a laptop or CI box. The flag must be set
before jax is imported anywhere, which is why it lives at the top of conftest.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
