"""Finding a tritonserver: the nvidia-pytriton wheel's Python backend and the numpy it was built for."""

import pytest

from medusa_forge.errors import ForgeError
from medusa_forge.serve.triton_install import check_wheel_numpy, find_tritonserver


@pytest.mark.parametrize("version", ["1.21.0", "1.26.4"])
def test_the_wheel_runs_with_numpy_one(version):
    check_wheel_numpy(version)


@pytest.mark.parametrize("version", ["2.0.0", "2.5.2"])
def test_the_wheel_is_refused_under_numpy_two_naming_the_version(version):
    with pytest.raises(ForgeError, match=rf"numpy<2 \(found {version}\)"):
        check_wheel_numpy(version)


def test_this_machine_finds_a_tritonserver_with_its_backend_and_stub():
    install = find_tritonserver()
    assert install.binary.is_file()
    if install.source == "pytriton":
        assert (install.backend_dir / "python" / "triton_python_backend_stub").is_file()
