"""The bundled Triton server of the nvidia-pytriton wheel: its environment and its command line.

The wheel ships `tritonserver` with the Python backend only (no ONNX Runtime or TensorRT backend) and the
Python backend's stub for each Python version. What it needs, as found here:
- the stub for the running Python copied into a backend directory, `--backend-directory` pointing there;
- `LD_LIBRARY_PATH` holding the wheel's nvidia_pytriton.libs and the directory of libpython (a Python built
  with --enable-shared);
- the Python the stub embeds finds its environment through PATH (it looks for `python3` there, then for
  pyvenv.cfg beside it): the environment's bin/ goes first on the server's PATH;
- numpy < 2 in that environment (nvidia-pytriton pins it).

The environment (`janusflow triton-env`, `make triton-env`) is a venv of the running Python holding numpy<2
and the wheel (without its client-side dependencies), whose site-packages end with the running
environment's own (a .pth), so torch, onnxruntime, transformers and janusflow_trt come from there while its
own numpy 1.26 shadows the project's numpy 2: one install of the heavy packages, no second copy.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from janusflow_trt.errors import JanusFlowError

WHEEL = "nvidia-pytriton==0.7.0"
NUMPY = "numpy>=1.26,<2"
READY = ".janusflow-triton-ready"  # written last: an environment without it is incomplete


@dataclass(frozen=True)
class Env:
    root: Path

    @property
    def site(self) -> Path:
        return self.root / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"

    @property
    def server_dir(self) -> Path:
        return self.site / "pytriton" / "tritonserver"

    @property
    def tritonserver(self) -> Path:
        return self.server_dir / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "triton-backends"

    @property
    def ready(self) -> bool:
        return (self.root / READY).is_file() and self.tritonserver.is_file()


def unsupported() -> str | None:
    """Why the bundled server cannot run here (None: it can). The wheel is manylinux_2_35 x86_64 and has
    stubs for CPython 3.8-3.13 linked against a shared libpython."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"the nvidia-pytriton wheel is for Linux x86_64, this is {sys.platform} {platform.machine()}"
    libc = platform.libc_ver()
    if libc[0] != "glibc" or tuple(int(x) for x in libc[1].split(".")[:2]) < (2, 35):
        return f"the nvidia-pytriton wheel needs glibc >= 2.35, this is {libc[0]} {libc[1]}"
    if not (3, 8) <= sys.version_info[:2] <= (3, 13):
        return f"the wheel has Python-backend stubs for CPython 3.8-3.13, this is {platform.python_version()}"
    if not libpython().is_file():
        return f"this Python has no shared libpython ({libpython()}): the stub links against it"
    return None


def libpython() -> Path:
    major, minor = sys.version_info[:2]
    return Path(sysconfig.get_config_var("LIBDIR") or "") / f"libpython{major}.{minor}.so.1.0"


def _pip(env: Env, *args: str) -> None:
    subprocess.run([str(env.root / "bin" / "python"), "-m", "pip", "install", "-q", *args], check=True)


def build_env(root: str | Path) -> Env:
    """Make (or finish) the environment at root; -> it. Idempotent: a ready one is left as it is."""
    env = Env(Path(root).absolute())
    if env.ready:
        return env
    why = unsupported()
    if why:
        raise JanusFlowError(f"cannot run the bundled Triton server here: {why}")
    try:
        if not (env.root / "bin" / "python").is_file():
            subprocess.run([sys.executable, "-m", "venv", str(env.root)], check=True)
        _pip(env, NUMPY)
        _pip(env, "--no-deps", WHEEL)  # the server binary and stubs; its client-side deps are not used
    except subprocess.CalledProcessError as e:
        raise JanusFlowError(f"making the Triton environment {env.root} failed: {e}") from None
    # this environment's packages after the venv's own (numpy<2 first): one line per site directory
    sites = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (env.site / "zz-janusflow-project.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in sites))
    python = env.backends / "python"
    python.mkdir(parents=True, exist_ok=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _copy(env.server_dir / "backends" / "python" / f, python / f)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    _copy(env.server_dir / "python_backend_stubs" / version / "triton_python_backend_stub",
          python / "triton_python_backend_stub")
    (env.root / READY).write_text(f"{WHEEL}\n")
    return env


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(src.read_bytes())
    os.chmod(tmp, src.stat().st_mode)
    os.replace(tmp, dst)


def server_command(env: Env, repo: str | Path, http_port: int, grpc_port: int, metrics_port: int,
                   host: str = "127.0.0.1") -> tuple[list[str], dict[str, str]]:
    """-> (argv, environment) of tritonserver on `repo`, listening on host only."""
    if not env.ready:
        raise JanusFlowError(f"no Triton environment at {env.root} (run `janusflow triton-env --env {env.root}`)")
    argv = [str(env.tritonserver), "--model-repository", str(Path(repo).absolute()),
            "--backend-directory", str(env.backends), "--http-address", host, "--http-port", str(http_port),
            "--grpc-address", host, "--grpc-port", str(grpc_port), "--metrics-address", host,
            "--metrics-port", str(metrics_port), "--allow-gpu-metrics", "false", "--exit-timeout-secs", "5"]
    environ = dict(os.environ)
    environ["PATH"] = f"{env.root / 'bin'}{os.pathsep}{environ.get('PATH', '')}"
    libs = [str(env.site / "nvidia_pytriton.libs"), str(libpython().parent)]
    environ["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [environ.get("LD_LIBRARY_PATH")] if p])
    return argv, environ


def timed_build(root: str | Path) -> tuple[Env, float]:
    t0 = time.perf_counter()
    env = build_env(root)
    return env, time.perf_counter() - t0
