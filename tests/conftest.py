"""Test set-up: 8 fake CPU devices (sharding tests), float32 matmuls, paths to the shared fixtures."""

import os
import pathlib

# Must happen before jax is imported anywhere.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURE = SHARED / "fixtures" / "ov15-tiny"


@pytest.fixture(scope="session")
def fixture_dir() -> pathlib.Path:
    if not (FIXTURE / "model.safetensors").exists():
        pytest.fail(f"the ov15-tiny fixture is missing at {FIXTURE} (../shared must sit beside the repo)")
    return FIXTURE


def pytest_collection_modifyitems(config, items):
    gpu = any(d.platform == "gpu" for d in jax.devices()) if os.environ.get("JAX_PLATFORMS") != "cpu" else False
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(skip_gpu)
