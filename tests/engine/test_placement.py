"""Memory planning without the hardware: two pretend GPUs, a machine too small, 8-bit weights."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest
import torch

from tests.tiny_models import tiny_llama_config
from vicuna.config import ModelSettings
from vicuna.engine import placement
from vicuna.engine.memory import GPU, gib, model_size, parse_bytes, probe_hardware
from vicuna.errors import DoesNotFitError, VicunaError

CONFIG = tiny_llama_config(1000, num_hidden_layers=8, hidden_size=256, intermediate_size=512)
HALF = (
    "bfloat16"
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    else "float16"
)  # GPUs' 16 bits


def test_layers_are_balanced_over_two_pretend_gpus():
    size = model_size(CONFIG).weight_bytes(torch.float16)
    plan = placement.plan_placement(CONFIG, torch.float16, [size, size])
    layers = {k: v for k, v in plan.items() if ".layers." in k}
    if not layers:  # accelerate may keep whole groups; expand the layer prefix
        layers = {k: v for k, v in plan.items() if "layers" in k}
    on = [v for v in plan.values()]
    assert set(on) == {0, 1}
    first = sum(1 for k, v in layers.items() if v == 0)
    second = sum(1 for k, v in layers.items() if v == 1)
    assert abs(first - second) <= 2, plan


@pytest.mark.parametrize("shares", [(2, 1), (1, 2), (3, 1)])
def test_unequal_gpus_get_layers_in_proportion_to_their_memory(shares):
    """A large GPU beside a small one, in either order: the model fits when their memory together holds it,
    and each GPU holds about its share of the layers (a balanced split put half on the small one, and
    refused when it could not)."""
    size = model_size(CONFIG).weight_bytes(torch.float16)
    budgets = [int(1.3 * size * s / sum(shares)) for s in shares]
    plan = placement.plan_placement(CONFIG, torch.float16, budgets)
    first = sum(1 for k, v in plan.items() if ".layers." in k and v == 0)
    assert abs(first - CONFIG.num_hidden_layers * shares[0] / sum(shares)) <= 1.5, plan


def test_accelerate_is_told_the_layers_not_to_split_as_a_list(monkeypatch):
    """Recent transformers keep a model's `_no_split_modules` as a set, which accelerate before 1.14 takes
    for one class name: each GPU's share then ended inside a decoder layer, and the layers were no longer
    spread in proportion to the GPUs' memory."""
    import accelerate.utils

    told = []
    infer = accelerate.utils.infer_auto_device_map

    def spy(model, **kwargs):
        told.append(kwargs["no_split_module_classes"])
        return infer(model, **kwargs)

    monkeypatch.setattr(accelerate.utils, "infer_auto_device_map", spy)
    size = model_size(CONFIG).weight_bytes(torch.float16)
    placement.plan_placement(CONFIG, torch.float16, [size, size])
    assert told == [["LlamaDecoderLayer"]]


def test_plan_refuses_gpus_that_are_too_small():
    with pytest.raises(DoesNotFitError, match="does not fit on 2 GPU"):
        placement.plan_placement(CONFIG, torch.float16, [10_000, 10_000])


def test_too_big_for_ram_says_which_flags_fit(monkeypatch):
    size = model_size(CONFIG)
    need_bf16 = size.weight_bytes(torch.bfloat16) + size.kv_bytes(placement.KV_TOKENS, torch.bfloat16)
    hw = dataclasses.replace(probe_hardware(), ram_available=int(need_bf16 * 1.15))
    monkeypatch.setattr(placement, "probe_hardware", lambda: hw)
    settings = ModelSettings(dtype="float32")
    with pytest.raises(DoesNotFitError) as err:
        placement.check_fits(CONFIG, settings, torch.device("cpu"), torch.float32)
    message = str(err.value)
    assert "these would fit" in message and "--device cpu --dtype bfloat16" in message
    assert "--dtype float32 |" not in message


def test_two_pretend_gpus_in_the_fit_check(monkeypatch):
    size = model_size(CONFIG)
    need = (
        size.weight_bytes(torch.bfloat16) + size.kv_bytes(placement.KV_TOKENS, torch.bfloat16)
    ) * placement.HEADROOM
    gpus = tuple(GPU(i, "Pretend", int(need), int(need * 0.85), (8, 0)) for i in range(2))
    hw = dataclasses.replace(probe_hardware(), gpus=gpus)
    monkeypatch.setattr(placement, "probe_hardware", lambda: hw)
    options = {o.flags: o.fits for o in placement.fit_options(size, hw, ModelSettings())}
    assert options[f"--device cuda --dtype {HALF}"] is False
    assert options[f"--device cuda --dtype {HALF} --num-gpus 2"] is True
    assert options[f"--device cuda --dtype {HALF} --load-8bit"] is True


def test_gpu_options_name_their_dtype(monkeypatch):
    """`--device cuda --dtype float32` too big for the GPU was told 'these would fit: --device cuda', the
    flags it had run with: the GPU options were sized in 16 bits but did not say so."""
    size = model_size(CONFIG)
    need = (size.weight_bytes(torch.float16) + size.kv_bytes(placement.KV_TOKENS, torch.float16)) * (
        placement.HEADROOM
    )
    gpu = GPU(0, "Pretend", int(need * 2), int(need * 1.5), (8, 0))
    hw = dataclasses.replace(probe_hardware(), gpus=(gpu,), ram_available=0)
    monkeypatch.setattr(placement, "probe_hardware", lambda: hw)
    with pytest.raises(DoesNotFitError, match="these would fit: --device cuda --dtype float16 "):
        placement.check_fits(CONFIG, ModelSettings(dtype="float32"), torch.device("cuda"), torch.float32)


def test_a_mac_is_offered_its_gpu(monkeypatch):
    """On a Mac a model too big for 16 bits was told only of `--device cpu ... --load-8bit`, never of Apple's
    GPU (MPS), which shares the same RAM and is what the chat had chosen."""
    size = model_size(CONFIG)
    need_8bit = size.weight_bytes(torch.float16, True) + size.kv_bytes(placement.KV_TOKENS, torch.float16)
    hw = dataclasses.replace(probe_hardware(), gpus=(), mps=True, ram_available=int(need_8bit * 1.15))
    monkeypatch.setattr(placement, "probe_hardware", lambda: hw)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)  # macOS 14
    options = {o.flags: o.fits for o in placement.fit_options(size, hw, ModelSettings())}
    assert options["--device mps --dtype float16"] is False
    assert options["--device mps --dtype float16 --load-8bit"] is True
    with pytest.raises(DoesNotFitError, match=r"these would fit: .*--device mps --dtype float16 --load-8bit"):
        placement.check_fits(CONFIG, ModelSettings(), torch.device("mps"), torch.float16)


def test_a_mac_before_macos_14_is_not_offered_8bit_weights_on_its_gpu(monkeypatch):
    """On macOS 13 `--device mps --load-8bit` is refused before loading (its scales are bfloat16, which
    Apple's GPU computes in from macOS 14), but doctor and the fit check offered it as the flags that fit."""
    size = model_size(CONFIG)
    hw = dataclasses.replace(probe_hardware(), gpus=(), mps=True, ram_available=2**40)
    monkeypatch.setattr(
        torch.backends.mps, "is_macos_or_newer", lambda major, minor: (major, minor) < (14, 0)
    )
    offered = [o.flags for o in placement.fit_options(size, hw, ModelSettings()) if "mps" in o.flags]
    assert offered == ["--device mps --dtype float16"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(VicunaError, match="--load-8bit"):  # as the flag is answered there
        placement.resolve_device(ModelSettings(device="mps", load_8bit=True))


def test_8bit_weights_are_fitted_on_one_gpu_as_they_are_loaded(monkeypatch, capsys):
    """--load-8bit quantizes the whole model and moves it to one GPU: two GPUs that hold it only together
    are neither offered nor accepted for it."""
    size = model_size(CONFIG)
    need = (size.weight_bytes(torch.bfloat16, True) + size.kv_bytes(placement.KV_TOKENS, torch.bfloat16)) * (
        placement.HEADROOM
    )
    gpus = tuple(GPU(i, "Pretend", int(need), int(need * 0.8), (8, 0)) for i in range(2))
    hw = dataclasses.replace(probe_hardware(), gpus=gpus)
    monkeypatch.setattr(placement, "probe_hardware", lambda: hw)
    options = {o.flags: o.fits for o in placement.fit_options(size, hw, ModelSettings())}
    assert options[f"--device cuda --dtype {HALF} --load-8bit"] is False
    assert f"--device cuda --dtype {HALF} --num-gpus 2 --load-8bit" not in options
    settings = ModelSettings(load_8bit=True, num_gpus=2)
    with pytest.raises(DoesNotFitError, match="1 GPU"):
        placement.check_fits(CONFIG, settings, torch.device("cuda"), torch.bfloat16)
    assert "--load-8bit keeps the model on one GPU; --num-gpus is ignored" in capsys.readouterr().err


def test_flags_refused_are_never_offered(monkeypatch):
    """A GPU whose free memory holds the model but not with the margin kept free: `--device cuda
    --load-8bit` was refused with 'these would fit: --device cuda --load-8bit', and doctor said yes to it."""
    size = model_size(CONFIG)
    need = (size.weight_bytes(torch.bfloat16, True) + size.kv_bytes(placement.KV_TOKENS, torch.bfloat16)) * (
        placement.HEADROOM
    )
    gpu = GPU(0, "Pretend", int(need * 2), int(need * 1.05), (8, 0))
    hw = dataclasses.replace(probe_hardware(), gpus=(gpu,), ram_available=0)
    monkeypatch.setattr(placement, "probe_hardware", lambda: hw)
    settings = ModelSettings(load_8bit=True)
    with pytest.raises(DoesNotFitError, match="no option fits this machine"):
        placement.check_fits(CONFIG, settings, torch.device("cuda"), torch.bfloat16)
    assert not any(o.fits for o in placement.fit_options(size, hw, settings))


def test_max_gpu_memory_is_used_as_given_up_to_what_is_free(monkeypatch):
    """90% of the free memory is the default only: a budget given above it was cut back to it, and a model
    that fits in the memory the user gave was refused."""
    size = model_size(CONFIG)
    need = (size.weight_bytes(torch.bfloat16) + size.kv_bytes(placement.KV_TOKENS, torch.bfloat16)) * (
        placement.HEADROOM
    )
    free = int(need / 0.95)
    gpu = GPU(0, "Pretend", free * 2, free, (8, 0))
    monkeypatch.setattr(
        placement, "probe_hardware", lambda: dataclasses.replace(probe_hardware(), gpus=(gpu,))
    )
    with pytest.raises(DoesNotFitError, match="1 GPU"):
        placement.check_fits(CONFIG, ModelSettings(), torch.device("cuda"), torch.bfloat16)
    given = ModelSettings(max_gpu_memory=f"{int(need * 1.01)}B")
    assert placement.check_fits(CONFIG, given, torch.device("cuda"), torch.bfloat16) == {"": 0}
    beyond = ModelSettings(max_gpu_memory=f"{free * 2}B")  # more than is free: what is free
    with pytest.raises(DoesNotFitError, match=f"with {gib(free)} usable"):
        placement.check_fits(CONFIG, beyond, torch.device("cuda"), torch.float32)


def test_more_gpus_than_are_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(VicunaError, match="--num-gpus 2: only 1 GPU"):
        placement.resolve_device(ModelSettings(num_gpus=2))
    assert placement.resolve_device(ModelSettings(device="cuda")) == torch.device("cuda")


def test_parse_bytes():
    assert parse_bytes("20GiB") == 20 * 2**30
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes("13000MiB") == 13000 * 2**20


@pytest.mark.parametrize("text", ["20 apples", "13", "0GiB", "-5GiB", "inf", "13GiB,8GiB"])
def test_parse_bytes_refuses_what_is_no_size(text):
    """A bare number (13 bytes, then 'does not fit on 1 GPU of 0 MiB'), nothing or less, infinity (a
    traceback): each one line naming the flag."""
    with pytest.raises(VicunaError, match=f"--max-gpu-memory: cannot read '{text}'"):
        parse_bytes(text)


@pytest.mark.parametrize(("major", "dtype"), [(7, torch.float16), (8, torch.bfloat16)])
def test_auto_dtype_on_a_gpu_is_bfloat16_only_where_it_is_native(pretend_gpu, major, dtype):
    """A T4 (7.5) chatted in bfloat16: PyTorch makes bfloat16 tensors there (emulated, slowly), so
    `torch.cuda.is_bf16_supported()` says yes; float16 is what such a GPU computes in."""
    pretend_gpu("a GPU", major, 5)
    assert placement.resolve_dtype("auto", torch.device("cuda"), CONFIG) == dtype


def test_auto_dtype_is_measured_once_and_remembered(monkeypatch, tmp_path):
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(
        placement, "_time_reply", lambda config, d: calls.append(d) or (1.0 if d == torch.float32 else 0.5)
    )
    assert placement.resolve_dtype("auto", torch.device("cpu"), CONFIG) == torch.bfloat16
    assert placement.resolve_dtype("auto", torch.device("cpu"), CONFIG) == torch.bfloat16
    assert len(calls) == 2  # fp32 and bf16, measured once
    assert (tmp_path / "cpu-dtype.json").is_file()


def test_auto_dtype_timed_while_another_start_timed_its_model_keeps_both(monkeypatch, tmp_path):
    """A chat and a server started at once with two models: each read the remembered answers, timed its
    own, and wrote what it had read with its answer, so the one that wrote last dropped the other's, whose
    every next start timed its model again."""
    import json

    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    cache = tmp_path / "cpu-dtype.json"

    def timed(config, dtype):  # the other start remembers its model's answer meanwhile
        cache.write_text(json.dumps({"the other model": "float32"}))
        return 1.0 if dtype == torch.float32 else 0.5

    monkeypatch.setattr(placement, "_time_reply", timed)
    assert placement.resolve_dtype("auto", torch.device("cpu"), CONFIG) == torch.bfloat16
    known = json.loads(cache.read_text())
    assert known.pop("the other model") == "float32" and list(known.values()) == ["bfloat16"]


def test_auto_dtype_remembered_in_a_damaged_file_is_timed_again(monkeypatch, tmp_path):
    """cpu-dtype.json not UTF-8, not a JSON object, or naming no dtype: every start on the CPU (--dtype auto,
    the default) ended in a UnicodeDecodeError, TypeError or KeyError traceback until it was deleted."""
    import json

    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    cache = tmp_path / "cpu-dtype.json"
    monkeypatch.setattr(placement, "_time_reply", lambda config, d: 1.0 if d == torch.float32 else 0.5)
    placement.resolve_dtype("auto", torch.device("cpu"), CONFIG)
    (key,) = json.loads(cache.read_text())  # this CPU's and model's
    for damaged in (b"\xff\xfe{", b"[]", b"null", json.dumps({key: "float8", "other": ["float32"]}).encode()):
        cache.write_bytes(damaged)
        assert placement.resolve_dtype("auto", torch.device("cpu"), CONFIG) == torch.bfloat16, damaged
        assert json.loads(cache.read_text()) == {key: "bfloat16"}  # written again


def test_auto_dtype_not_remembered_on_a_read_only_home_is_still_used(monkeypatch, tmp_path, caplog):
    """A container's read-only $VICUNA_HOME, its model converted on another machine (whose CPU gave another
    key): the server stopped with 'error: Permission denied: .../cpu-dtype.NNN.tmp' after timing both."""
    home = tmp_path / "home"
    home.write_text("")  # no folder can be made here, whoever runs the test (root ignores read-only modes)
    monkeypatch.setenv("VICUNA_HOME", str(home))
    monkeypatch.setattr(placement, "_time_reply", lambda config, d: 1.0 if d == torch.float32 else 0.5)
    assert placement.resolve_dtype("auto", torch.device("cpu"), CONFIG) == torch.bfloat16
    warned = caplog.text  # a warning, said whether progress was asked for or not
    assert f"cannot remember the faster CPU dtype in {home / 'cpu-dtype.json'}" in warned
    assert "set VICUNA_HOME to a writable one" in warned


def test_reply_timing_runs_the_models_own_layers():
    assert placement.trial_layers(CONFIG) == CONFIG.num_hidden_layers  # small layers: all of them
    assert placement._time_reply(CONFIG, torch.float32) > 0


def test_auto_dtype_of_a_config_without_intermediate_size_is_measured(monkeypatch, tmp_path):
    """GPT-2-style configs have no intermediate_size: `vicuna chat` (--dtype auto on a CPU) ended in an
    AttributeError traceback before loading."""
    from transformers import GPT2Config

    from vicuna.engine import kernel

    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    monkeypatch.setattr(kernel, "load", lambda progress=True: None)  # not compiled again into tmp_path
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4)
    assert placement.trial_layers(config) == 2
    assert placement.resolve_dtype("auto", torch.device("cpu"), config) in (torch.float32, torch.bfloat16)


@pytest.mark.parametrize(("name", "major", "minor"), [("Tesla T4", 7, 5), ("NVIDIA A100-SXM4-40GB", 8, 0)])
def test_bfloat16_asked_for_where_it_is_emulated_is_said_not_refused(
    pretend_gpu, capfd, caplog, name, major, minor
):
    """`--dtype bfloat16` on a T4 chatted in emulated bfloat16, slowly, without a word. Said as a logged
    warning, not printed: a library's caller (`load_engine(..., progress=False)`) could not route or
    silence it as it can the load's other warnings."""
    pretend_gpu(name, major, minor)
    cuda = torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="vicuna.placement"):
        assert placement.resolve_dtype("bfloat16", cuda, CONFIG) == torch.bfloat16
    assert capfd.readouterr() == ("", "")
    if major < 8:
        assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
            (
                "vicuna.placement",
                logging.WARNING,
                "--dtype bfloat16 on the Tesla T4 (compute capability 7.5), which has no native bfloat16 "
                "(8.0 and newer have it): PyTorch emulates it, slowly; try --dtype float16",
            )
        ]
    else:
        assert caplog.records == []
    caplog.clear()
    assert placement.resolve_dtype("float16", cuda, CONFIG) == torch.float16
    assert placement.resolve_dtype("auto", cuda, CONFIG) in (torch.float16, torch.bfloat16)
    assert caplog.records == []  # float16, and what auto picks, are the GPU's own


def test_gpu_flags_without_a_gpu_say_why_only_where_the_model_runs_on_the_cpu(monkeypatch, capsys):
    """The notice that a PyTorch without CUDA is a CPU-only build was said on a Mac's PyTorch too, whose model
    runs on Apple's GPU (mps), and of a ROCm build (torch.version.hip, no torch.version.cuda)."""
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    placement.check_fits(CONFIG, ModelSettings(num_gpus=2), torch.device("mps"), torch.float16)
    assert "notice: --num-gpus applies to CUDA GPUs; on mps it is ignored" in capsys.readouterr().err
    placement.check_fits(CONFIG, ModelSettings(num_gpus=2), torch.device("cpu"), torch.float32)
    assert (
        f"this PyTorch ({torch.__version__}) is a CPU-only build; the model runs on cpu"
        in capsys.readouterr().err
    )
    monkeypatch.setattr(torch.version, "hip", "6.2")
    placement.check_fits(CONFIG, ModelSettings(num_gpus=2), torch.device("cpu"), torch.float32)
    assert (
        f"this PyTorch ({torch.__version__}) sees no CUDA GPU; the model runs on cpu"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("cuda", "said"), [(None, "is a CPU-only build; install one built for CUDA"), ("12.8", "nvidia-smi")]
)
def test_device_cuda_without_a_gpu_says_why(monkeypatch, cuda, said):
    """`--device cuda` with a CPU-only PyTorch (pip's default on Windows) on a machine with a GPU was told
    only "no CUDA GPU is visible to PyTorch; use --device cpu"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(VicunaError, match="--device cuda: no CUDA GPU is visible to PyTorch") as err:
        placement.resolve_device(ModelSettings(device="cuda"))
    assert said in str(err.value) and str(err.value).endswith("use --device cpu")


def test_8bit_weights_for_apples_gpu_are_read_on_the_cpu_and_quantized_there(monkeypatch):
    """`--device mps --load-8bit` loaded the whole 16-bit model onto Apple's GPU before quantizing it: in
    the RAM the GPU shares, twice what the fit check had allowed for (a 7B model: 13.5 GB, not 7)."""
    hw = dataclasses.replace(probe_hardware(), gpus=(), mps=True, ram_available=2**40)
    monkeypatch.setattr(placement, "probe_hardware", lambda: hw)
    settings = ModelSettings(device="mps", load_8bit=True)
    assert placement.check_fits(CONFIG, settings, torch.device("mps"), torch.float16) == {"": "cpu"}
    assert placement.check_fits(CONFIG, ModelSettings(device="mps"), torch.device("mps"), torch.float16) == {
        "": "mps"
    }


def test_auto_dtype_on_a_cpu_whose_ram_holds_the_model_only_in_bfloat16(monkeypatch, tmp_path):
    """A laptop with the RAM for a model in bfloat16 but not in float32: `--dtype auto` timed both, took
    float32 where it ran faster, and the fit check then refused it ('these would fit: --device cpu --dtype
    bfloat16'), after a trial that on a 7B model builds gigabytes of layers."""
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    timed = []
    monkeypatch.setattr(
        placement, "_time_reply", lambda config, d: timed.append(d) or (0.5 if d == torch.float32 else 1.0)
    )
    size = model_size(CONFIG)
    bf16 = (
        size.weight_bytes(torch.bfloat16) + size.kv_bytes(placement.KV_TOKENS, torch.bfloat16)
    ) * placement.HEADROOM
    hw = dataclasses.replace(probe_hardware(), gpus=(), ram_available=int(bf16 * 1.2))
    monkeypatch.setattr(placement, "probe_hardware", lambda: hw)
    dtype = placement.resolve_dtype("auto", torch.device("cpu"), CONFIG)
    assert dtype == torch.bfloat16 and timed == []
    placement.check_fits(CONFIG, ModelSettings(), torch.device("cpu"), dtype)  # not refused
    hw = dataclasses.replace(hw, ram_available=int(bf16 * 3))  # float32 fits too: timed, and it wins here
    assert placement.resolve_dtype("auto", torch.device("cpu"), CONFIG) == torch.float32
    assert timed == [torch.float32, torch.bfloat16]


@pytest.mark.parametrize(
    ("flags", "refused"),
    [
        ({"load_8bit": True}, "--load-8bit (its scales are bfloat16) on mps needs macOS 14"),
        ({"dtype": "bfloat16"}, "--dtype bfloat16 on mps needs macOS 14"),
        ({"dtype": "float16"}, None),
        ({"load_8bit": True, "device": "cpu"}, None),
    ],
)
def test_bfloat16_on_apples_gpu_before_macos_14_is_refused_before_loading(monkeypatch, flags, refused):
    """On macOS 13 (PyTorch 2.9 and older run there) Apple's GPU has no bfloat16: `--device mps --load-8bit`
    and `--dtype bfloat16` stopped with "TypeError: MPS BFloat16 is only supported on MacOS 14 or newer"
    and a traceback, once the weights were read."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.backends.mps, "is_macos_or_newer", lambda major, minor: (major, minor) < (14, 0)
    )
    settings = ModelSettings(**{"device": "mps", **flags})
    if refused is None:
        assert placement.resolve_device(settings) == torch.device(settings.device)
        return
    with pytest.raises(VicunaError, match=re.escape(refused)):
        placement.resolve_device(settings)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)  # macOS 14
    assert placement.resolve_device(settings) == torch.device("mps")
