"""Med3DVLM loading options: accelerate device maps, bitsandbytes 8/4-bit requests, strictness of both routes."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from accelerate.utils import compute_module_sizes
from safetensors.torch import load_file, save_file

from voxtext.cli import main
from voxtext.errors import CheckpointError, InputError
from voxtext.models.med3dvlm import Med3DVLMForCausalLM, encode_prompts, load_med3dvlm
from voxtext.models.med3dvlm.model import device_of, load_dispatched, plan_device_map, quantization_config, read_config
from voxtext.phantom import generate_phantom
from voxtext.report import REPORT_PROMPT, Reporter, resolve_vlm, vision_config_of

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def default_vlm():
    folder = resolve_vlm("default")
    config = read_config(folder)
    return folder, config, vision_config_of(config)


@pytest.fixture(scope="module")
def volume():
    return generate_phantom(11, shape=(48, 48, 48)).image


def greedy_ids(reporter: Reporter, image, prompt: str = REPORT_PROMPT, separator: str = "") -> list[int]:
    inputs = encode_prompts(reporter.tokenizer, [prompt], reporter.model.num_image_tokens, separator)
    inputs = {k: v.to(reporter.device) for k, v in inputs.items()}
    ids = reporter.model.generate(images=reporter.prepare(image), **inputs, do_sample=False, temperature=None,
                                  top_p=None, top_k=None, max_new_tokens=48)
    return ids[0].tolist()


def test_cpu_device_map_gives_the_same_greedy_tokens(volume):
    plain = Reporter("default", device="cpu")
    expected = greedy_ids(plain, volume)
    assert len(expected) > 10
    for device_map in ("cpu", {"": "cpu"}, "auto"):  # "auto" on a machine without GPU: everything on the CPU
        mapped = Reporter("default", device_map=device_map)
        assert mapped.model.hf_device_map  # loaded by from_pretrained + accelerate, not the plain route
        assert mapped.device == torch.device("cpu")
        assert greedy_ids(mapped, volume) == expected, device_map
        question = "Is there a kidney stone?"
        assert mapped.ask(volume, question, ["yes", "no"], greedy=True) == plain.ask(volume, question, ["yes", "no"],
                                                                                     greedy=True)
    weights = plain.model.state_dict()
    loaded = mapped.model.state_dict()
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_cli_device_map_option(tmp_path, capsys):
    generate_phantom(5, shape=(32, 32, 32)).save(tmp_path)
    image = str(tmp_path / "image.nii.gz")
    expected = Reporter("default", device="cpu").ask(image, "Is there a liver lesion?", ["yes", "no"], greedy=True)
    capsys.readouterr()
    code = main(["ask", image, "Is there a liver lesion?", "--choices", "yes", "no", "--greedy",
                 "--device-map", '{"": "cpu"}'])
    assert capsys.readouterr().out.strip() == str(expected) and code == (0 if expected.index is not None else 1)


def test_auto_device_map_splits_the_llm_and_keeps_the_vision_side_first(default_vlm):
    folder, config, vision = default_vlm
    with torch.device("meta"):
        sizes = compute_module_sizes(Med3DVLMForCausalLM(config, vision))
    layers = config.num_hidden_layers
    # room on device 0 for the embeddings and about two decoder layers, beside the largest unsplit block
    first = sizes["model.vision_tower"] + sizes["model.embed_tokens"] + int(2.5 * sizes["model.layers.0"])
    memory = {0: first, 1: 10 * sizes[""], "cpu": 10 * sizes[""]}
    for strategy in ("auto", "sequential"):
        plan = plan_device_map(config, vision, strategy, max_memory=dict(memory))
        where = [device_of(plan, f"model.layers.{i}") for i in range(layers)]
        assert {d.index for d in where} == {0, 1}, plan  # the LLM is spread over both GPUs
        assert device_of(plan, "model.embed_tokens").index == 0
        for module in ("model.vision_tower", "model.mm_projector"):  # unsplit, where the features are inserted
            assert plan[module] == 0
            assert not any(k.startswith(module + ".") for k in plan)
        assert device_of(plan, "lm_head").index == 1
    # 8-bit decoder layers take a quarter of the fp32 room: the same budget now holds the whole LLM
    plan = plan_device_map(config, vision, "sequential", load_in="8bit", max_memory=dict(memory))
    assert {device_of(plan, f"model.layers.{i}").index for i in range(layers)} == {0}
    assert plan_device_map(config, vision, "cuda:1") == {"": "cuda:1"}
    assert plan_device_map(config, vision, {"model": 0, "lm_head": 1}) == {"model": 0, "lm_head": 1}


@pytest.mark.skipif(not NO_CUDA, reason="checks the messages of a machine without CUDA")
@pytest.mark.parametrize("load_in", ["8bit", "4bit"])
def test_quantized_loading_says_what_is_missing(load_in, tmp_path, capsys, volume):
    with pytest.raises(InputError, match=f"in {load_in} needs a CUDA GPU") as error:
        Reporter("default", device="cpu", load_in=load_in)
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    assert ("pip install bitsandbytes" in str(error.value)) != has_bnb
    with pytest.raises(InputError, match="CUDA GPU"):
        Reporter("default", device_map="auto", load_in=load_in)
    phantom = tmp_path / "case"
    generate_phantom(3, shape=(32, 32, 32)).save(phantom)
    assert main(["report", str(phantom / "image.nii.gz"), "--load-in", load_in, "--device", "cpu"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err


def test_bad_load_in_and_device_map_values_are_refused(default_vlm):
    folder, config, vision = default_vlm
    with pytest.raises(InputError, match="load_in must be one of"):
        Reporter("default", device="cpu", load_in="3bit")
    with pytest.raises(InputError, match="no device for 'model.embed_tokens'"):
        Reporter("default", device_map={"lm_head": "cpu"})


def test_device_map_loading_stays_strict(default_vlm, tmp_path):
    folder, config, vision = default_vlm
    extra = tmp_path / "extra-key"
    shutil.copytree(folder, extra)
    weights = load_file(extra / "model.safetensors")
    save_file({**weights, "model.unused.weight": torch.zeros(2)}, extra / "model.safetensors")
    with pytest.raises(CheckpointError, match="1 unexpected"):
        load_med3dvlm(extra, vision, device_map="cpu")

    missing = tmp_path / "missing-key"
    shutil.copytree(folder, missing)
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, missing / "model.safetensors")
    with pytest.raises(CheckpointError, match="1 missing"):
        load_med3dvlm(missing, vision, device_map={"": "cpu"})

    tower = tmp_path / "other-tower"
    shutil.copytree(folder, tower)
    prefix = "model.vision_tower."
    vision_weights = {k[len(prefix):]: v.clone() for k, v in weights.items() if k.startswith(prefix)}
    name = next(k for k, v in vision_weights.items() if v.is_floating_point())
    vision_weights[name] += 1
    torch.save(vision_weights, tower / "vision_tower.bin")
    with pytest.raises(CheckpointError, match="different vision tower weights"):
        load_med3dvlm(tower, vision, device_map="cpu")


@pytest.mark.parametrize("load_in", ["8bit", "4bit"])
def test_quantized_weights_load_strictly_with_the_vision_side_unquantized(load_in, default_vlm, volume):
    """The from_pretrained route with bitsandbytes (which also quantizes on a CPU from 0.45 on; Reporter still
    asks for CUDA): every checkpoint key consumed, only the decoder's Linear layers quantized, and it decodes."""
    bnb = pytest.importorskip("bitsandbytes")
    folder, config, vision = default_vlm
    quantization = quantization_config(load_in, torch.bfloat16)
    model = load_dispatched(folder, config, vision, torch.bfloat16, {"": "cpu"}, quantization)
    quantized = bnb.nn.Linear8bitLt if load_in == "8bit" else bnb.nn.Linear4bit
    assert all(isinstance(layer.mlp.down_proj, quantized) for layer in model.model.layers)
    unquantized = [*model.model.vision_tower.modules(), *model.model.mm_projector.modules(), model.lm_head]
    assert not any(isinstance(m, quantized) for m in unquantized)
    assert {p.dtype for p in model.model.mm_projector.parameters()} == {torch.bfloat16}
    plain = Reporter("default", device="cpu")
    inputs = encode_prompts(plain.tokenizer, [REPORT_PROMPT], model.num_image_tokens, "")
    ids = model.generate(images=plain.prepare(volume), **inputs, do_sample=False, temperature=None, top_p=None,
                         top_k=None, max_new_tokens=24)
    assert ids.shape[1] > 5 and plain.tokenizer.decode(ids[0], skip_special_tokens=True).strip()
