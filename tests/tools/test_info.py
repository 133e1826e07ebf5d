"""info: the figures from config.json and the safetensors headers equal those loading computes on
transformers' model, for every family and layout, and reading them imports neither torch nor
transformers."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers.checkpoints import FAMILY_CASES, make_checkpoint, make_llama4_multimodal_checkpoint, make_mxfp4_checkpoint
from safetensors.torch import load_file, save_file

from expertcache.tools.info import model_info


def _both(model_dir):
    quick, full = model_info(model_dir), model_info(model_dir, check=True)
    assert (quick.pop("checked"), full.pop("checked")) == ("headers", "model")
    return quick, full


@pytest.mark.parametrize("fused", [False, True], ids=["as-saved", "fused"])
@pytest.mark.parametrize("family", FAMILY_CASES)
def test_the_headers_give_the_figures_loading_gives(family, fused, checkpoint):
    quick, full = _both(checkpoint(family, fused=fused, **FAMILY_CASES[family]))
    assert quick == full


def test_mxfp4_bf16_and_sharded_checkpoints(tmp_path):
    quick, full = _both(make_mxfp4_checkpoint(tmp_path / "mx", **FAMILY_CASES["gpt_oss"]))
    assert quick == full and quick["dtype"] == "bfloat16" and quick["expert_layout"] == "fused"
    quick, full = _both(make_checkpoint(tmp_path / "sh", "qwen3_moe", shards=3, dtype=torch.bfloat16, **{
        k: v for k, v in FAMILY_CASES["qwen3_moe"].items()}))
    assert quick == full and quick["dtype"] == "bfloat16"


def test_a_multimodal_checkpoint_gives_its_text_models_figures(tmp_path):
    quick, full = _both(make_llama4_multimodal_checkpoint(tmp_path, **FAMILY_CASES["llama4_text"]))
    assert quick == full and quick["family"] == "llama4_text"


def test_layers_past_the_model_stay_out_of_the_figures(tmp_path):
    """A multi-token-prediction layer saved after the decoder layers (DeepSeek-V3, GLM-4.5) is not
    part of the model: neither reading counts its experts or its bytes."""
    model_dir = make_checkpoint(tmp_path / "m", "deepseek_v3", **FAMILY_CASES["deepseek_v3"])
    before = model_info(model_dir)
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    st = next(model_dir.glob("*.safetensors"))
    tensors = load_file(st)
    last = f"model.layers.{layers - 1}."
    tensors.update({k.replace(last, f"model.layers.{layers}."): v.clone() for k, v in tensors.items() if k.startswith(last)})
    save_file(tensors, st, metadata={"format": "pt"})
    quick, full = _both(model_dir)
    assert quick == full
    before.pop("checked")
    assert quick == before


def test_a_layer_missing_an_expert_is_refused_from_the_headers(tmp_path):
    model_dir = make_checkpoint(tmp_path / "m", "mixtral", **FAMILY_CASES["mixtral"])
    st = next(model_dir.glob("*.safetensors"))
    tensors = {k: v for k, v in load_file(st).items() if ".experts.3.w2." not in k or ".layers.1." not in k}
    save_file(tensors, st, metadata={"format": "pt"})
    with pytest.raises(Exception, match=r"missing expert tensor .*layers\.1\..*experts\.3\.w2\.weight"):
        model_info(model_dir)


def test_info_reads_no_weights_and_imports_neither_torch_nor_transformers(tmp_path):
    """`expertcache info` answers in well under a second: torch alone takes seconds to import."""
    model_dir = tmp_path / "demo"
    from expertcache.config import demo_model_dir

    shutil.copytree(demo_model_dir(), model_dir)
    code = ("import sys\nfrom expertcache.cli import main\nrc = main(['info', sys.argv[1], '--json'])\n"
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, check=True).stdout
    figures, flags = out.strip().splitlines()
    assert json.loads(figures)["checked"] == "headers"
    assert flags.split() == ["0", "False", "False"]


@pytest.mark.parametrize("bits,group,dense", [(8, 0, "keep"), (4, 32, "int8"), (4, 64, "keep")])
def test_pack_quantized_checkpoints_from_the_headers(bits, group, dense, checkpoint, tmp_path):
    from expertcache.tools.quantize import quantize_checkpoint

    src = checkpoint("qwen2_moe", **{**FAMILY_CASES["qwen2_moe"], "expert_intermediate": 64})
    out = tmp_path / "q"
    quantize_checkpoint(src, out, bits=bits, group_size=group, dense=dense, progress=False)
    quick, full = _both(out)
    assert quick == full
    assert quick["expert_precision"] == f"int{bits}-" + (f"g{group}" if group else "channel")
