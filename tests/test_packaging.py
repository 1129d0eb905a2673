"""Packaging: the kernels folder is installed as `unigrpo_kernels`, never as a bare `kernels` module (which
transformers would take for the Hugging Face kernels-hub package), and transformers still builds models with
this project installed — also from the repository root, where the folder sits on sys.path."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, cwd: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


# The module `kernels`, if one is importable, and whether it is this repository's folder. The Hugging Face
# kernels-hub package itself may be installed (newer transformers depend on it); only ours must never be it.
WHICH_KERNELS = (
    "import importlib.util, os\n"
    "spec = importlib.util.find_spec('kernels')\n"
    "places = [] if spec is None else [spec.origin or ''] + list(spec.submodule_search_locations or [])\n"
    "root = os.path.realpath(%r)\n"
    "ours = any(p and os.path.realpath(p).startswith(root + os.sep) for p in places)\n"
)


def test_kernels_installed_under_namespaced_name_only(tmp_path):
    out = run_python(WHICH_KERNELS % ROOT + "import unigrpo_kernels\n"
                     "print(ours)\n"
                     "print(unigrpo_kernels.__file__)\n", cwd=str(tmp_path))
    ours, path = out.split()
    assert ours == "False"
    assert os.path.samefile(os.path.dirname(path), os.path.join(ROOT, "kernels"))


def test_transformers_builds_a_model_with_unigrpo_installed():
    code = (
        WHICH_KERNELS % ROOT
        + "import unigrpo, unigrpo_kernels, unigrpo.model, transformers, torch\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "if is_kernels_available():   # the hub package is installed: `kernels` from the root must be it\n"
        "    import kernels\n"
        "    assert not os.path.realpath(kernels.__file__).startswith(root + os.sep), kernels.__file__\n"
        "cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,"
        " num_attention_heads=4, num_key_value_heads=2)\n"
        "m = transformers.LlamaForCausalLM(cfg)\n"
        "out = m(torch.randint(0, 64, (1, 5)))\n"
        "assert out.logits.shape == (1, 5, 64)\n"
        "print('ok')\n"
    )
    assert run_python(code, cwd=ROOT).strip().endswith("ok")
