"""unigrpo: a kernel-accelerated UniGRPO trainer.

Packages: `unigrpo` (the trainer library), `unigrpo_kernels` (the fused ops, sources in kernels/),
`unigrpo_experiments` (the paper's comparisons behind `unigrpo compare`, sources in experiments/) and
`unigrpo_bench` (the benchmarks behind `unigrpo bench`, sources in bench/).
The kernels folder is installed under the namespaced name `unigrpo_kernels`: a bare top-level `kernels`
module would be mistaken by transformers for the Hugging Face kernels-hub package.

CUDA: when nvcc is found (and UNIGRPO_BUILD_CUDA is not "0"), CMakeLists.txt builds the CUDA sources of
kernels/cuda into a shared library that unigrpo_kernels loads with ctypes. Without nvcc the install
warns and goes on; the torch and Triton backends need no build.
"""
import os
import shutil
import subprocess
import sys
import warnings

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


# source folder → installed package name: bare top-level names like `kernels` or `experiments` would clash
# with other distributions' packages
PACKAGE_DIRS = {"kernels": "unigrpo_kernels", "experiments": "unigrpo_experiments", "bench": "unigrpo_bench"}


def _find_packages():
    pkgs = find_packages(include=["unigrpo", "unigrpo.*"])
    for folder, name in PACKAGE_DIRS.items():
        pkgs += [name + p[len(folder):] for p in find_packages(include=[folder, folder + ".*"])]
    return pkgs


class BuildWithCuda(build_py):
    """build_py that also builds the optional CUDA library with CMake when nvcc exists.

    CMake always writes build/cuda/lib/libunigrpo_cuda.so (the library's own default, so a later by-hand
    `cmake --build build/cuda` updates the same file); the .so is then copied to where kernels/cuda_lib.py
    looks: <build_lib>/unigrpo_kernels/cuda/ for a normal install (the wheel ships it), and, for an
    editable install (build_lib is then a temporary folder and `unigrpo_kernels` is imported from kernels/ in
    place), also kernels/cuda/ in the source tree (ignored by git).
    """

    def run(self):
        super().run()
        if os.environ.get("UNIGRPO_BUILD_CUDA", "1") == "0":
            return
        if not os.path.isdir(os.path.join("kernels", "cuda")):
            return
        nvcc = shutil.which("nvcc") or (
            os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None)
        if not nvcc or not os.path.exists(nvcc) or shutil.which("cmake") is None:
            warnings.warn("nvcc or cmake not found: skipping the CUDA backend of unigrpo_kernels")
            return
        build_dir = os.path.abspath(os.path.join("build", "cuda"))
        lib_dir = os.path.join(build_dir, "lib")
        built = os.path.join(lib_dir, "libunigrpo_cuda.so")
        cache = os.path.join(build_dir, "CMakeCache.txt")
        if os.path.isfile(cache):  # a build folder configured for another checkout path cannot be reused
            with open(cache, encoding="utf-8", errors="replace") as f:
                if f"CMAKE_HOME_DIRECTORY:INTERNAL={os.path.abspath('.')}\n" not in f.read():
                    shutil.rmtree(build_dir)
        try:
            # -DUNIGRPO_CUDA_OUT resets a cached output folder from an older configure
            subprocess.check_call(["cmake", "-S", ".", "-B", build_dir, f"-DUNIGRPO_CUDA_OUT={lib_dir}",
                                   f"-DCMAKE_CUDA_COMPILER={nvcc}"])
            subprocess.check_call(["cmake", "--build", build_dir, "-j"])
        except subprocess.CalledProcessError as err:  # the CUDA backend is optional
            warnings.warn(f"building the CUDA backend failed ({err}); the torch/triton backends still work")
            return
        if not os.path.isfile(built):
            warnings.warn(f"CMake built no {built}; the torch/triton backends still work")
            return
        targets = [os.path.join(self.build_lib, "unigrpo_kernels", "cuda")]
        if getattr(self, "editable_mode", False):
            targets.append(os.path.join("kernels", "cuda"))
        for target in targets:
            os.makedirs(target, exist_ok=True)
            dest = os.path.join(target, "libunigrpo_cuda.so")
            shutil.copy2(built, dest + ".tmp")
            os.replace(dest + ".tmp", dest)  # a new file, not an overwrite: a running process may map the old one


setup(
    name="unigrpo",
    version="0.1.0",
    description="Kernel-accelerated UniGRPO: joint GRPO on reasoning tokens and FlowGRPO on denoising steps",
    python_requires=">=3.10",
    packages=_find_packages(),
    package_dir={name: folder for folder, name in PACKAGE_DIRS.items()},
    package_data={"unigrpo": ["configs/*.yaml", "assets/tiny_base/*", "assets/tiny_edit_base/*"]},
    install_requires=[
        # torch is required but not pinned here: on CPU machines install it first with
        # `pip install torch==2.13.0` (a bare requirement would pull a multi-GB CUDA build).
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "safetensors",
        "pillow",
        "matplotlib",
        "tqdm",
        "transformers>=4.40",
        "requests",   # the remote-reward and VLM-judge HTTP clients
    ],
    extras_require={
        # triton runs the Triton kernels' tests in its CPU interpreter (TRITON_INTERPRET=1); on GPU machines
        # the triton that came with torch already satisfies this.
        "test": ["pytest", "hypothesis", "triton>=3.2; platform_system == 'Linux'"],
        "gpu": ["flash-attn", "nvidia-ml-py"],
    },
    entry_points={"console_scripts": ["unigrpo=unigrpo.cli:main"]},
    cmdclass={"build_py": BuildWithCuda},
)
