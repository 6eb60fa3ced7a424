"""The attack's groups on state and I/O: saved caches, policies, the cache API, the CLI (see `attack`)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from attack import ROOT, Attack, Late, Wrong, finite, same

TMP = Path(tempfile.mkdtemp(prefix="kvpack-attack-"))
PROMPT = 40


def tiny():
    from tiny_models import tiny_model

    return tiny_model("llama", seed=0)


def prompt_ids(seed: int, n: int = PROMPT, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def next_logits(model, cache, token: int = 5) -> torch.Tensor:
    batch = cache.layers[0].keys.shape[0] if cache.layers[0].is_initialized else 1
    with torch.no_grad():
        return model(torch.full((batch, 1), token), past_key_values=cache, use_cache=True).logits[:, -1].float()


# ---- saved caches ---------------------------------------------------------------------------------------------


def filled_cache(model, policy, seed: int, batch: int = 1):
    from kvpack import KVPackCache

    cache = KVPackCache(config=model.config, policy=policy)
    with torch.no_grad():
        model(prompt_ids(seed, batch=batch), past_key_values=cache, use_cache=True)
    return cache


def read_file(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["kvpack"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def write_file(path: Path, header: dict, tensors: dict, rechecksum: bool) -> None:
    from safetensors.torch import save_file

    from kvpack.hf import persist

    if rechecksum:
        header = {**header, "sha256": persist._digest(tensors, header)}
    save_file(tensors, str(path), metadata={"kvpack": json.dumps(header)})


def leaves(obj, path=()):
    """(path, value) of every leaf and container below ``obj`` (the JSON header)."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, (*path, i))


def edits(value):
    """Replacement values for one header field."""
    if isinstance(value, bool):
        return [not value, 1, None]
    if isinstance(value, int):
        return [value + 1, value - 1, 0, -1, 10**20, str(value), float(value) + 0.5, None]
    if isinstance(value, float):
        return [value * 2, -value, "x", None]
    if isinstance(value, str):
        return [value + "x", "", 3, None, "float16" if value != "float16" else "bfloat16", "torch.int8"]
    if isinstance(value, list):
        out = [[], value[:-1], value + value[-1:], "x", {"a": 1}] if value else [[1], "x", None]
        return out
    if isinstance(value, dict):
        return [{}, [], None, {**value, "extra": 1}] + [
            {k: v for k, v in value.items() if k != key} for key in list(value)[:6]
        ]
    return [0, "x"]


def set_at(obj, path, value):
    obj = copy.deepcopy(obj)
    if not path:
        return value
    target = obj
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return obj


def persist_cases(a: Attack) -> None:
    from kvpack import CachePolicy, load_cache, save_cache

    model = tiny()
    policies = {
        "int4/turbo3 block 8": CachePolicy(key="int:4", value="turbo_mse:3", residual=8, sinks=2, block=8),
        "channel keys, window f32": CachePolicy(key="int:2:axis=channel,group=8", value="int:4", residual=4, sinks=1,
                                                block=8, window_dtype=torch.float32),
        "pre-rope, fp_heads, skip": CachePolicy(key="turbo_prod:3", value="e8:3", residual=8, sinks=4,
                                                pre_rope_keys=True, skip_layers=(1,), seed=7),
    }  # fmt: skip
    for pname, policy in policies.items():
        batch = 2 if "channel" in pname else 1
        cache = filled_cache(model, policy, a.seed, batch=batch)
        if "pre-rope" in pname:  # beam reorder: the chunks record an order
            cache.reorder_cache(torch.tensor([0]))
        path = TMP / f"cache-{len(pname)}.safetensors"
        a.case("persist", f"[{pname}] save", lambda c=cache, p=path: save_cache(c, p, config=model.config), "ok")
        truth = next_logits(model, copy.deepcopy(cache))
        a.case("persist", f"[{pname}] load equals original",
               lambda p=path, t=truth: same(next_logits(model, load_cache(p, config=model.config)), t, "load"), "ok")  # fmt: skip
        header, tensors = read_file(path)
        header_cases(a, pname, model, header, tensors, truth)
        byte_cases(a, pname, model, path, truth)
        tensor_cases(a, pname, model, header, tensors, truth)
    api_cases(a, model, policies)
    interrupted_cases(a, model, policies["int4/turbo3 block 8"])


def _load_compare(model, path: Path, truth: torch.Tensor, what: str, **kwargs) -> str:
    from kvpack import load_cache

    cache = load_cache(path, config=model.config, **kwargs)
    y = next_logits(model, cache)
    if y.shape != truth.shape or not torch.equal(y, truth):
        finite(y, what)
        raise Wrong(f"{what}: loaded without error, next-token logits differ")
    return "correct"


def header_cases(a: Attack, pname: str, model, header: dict, tensors: dict, truth) -> None:
    paths = [(p, v) for p, v in leaves(header) if p and p[0] != "sha256"]
    a.rng.shuffle(paths)
    path = TMP / "edited.safetensors"
    for field_path, value in paths[:70]:
        for new in edits(value):
            if new == value and type(new) is type(value):
                continue
            edited = set_at(header, field_path, new)
            for rechecksum in (False, True):
                name = f"[{pname}] header {'.'.join(map(str, field_path))} = {json.dumps(new)[:40]}"
                name += " (re-checksummed)" if rechecksum else ""

                def run(edited=edited, rechecksum=rechecksum, name=name):
                    write_file(path, edited, tensors, rechecksum)
                    return _load_compare(model, path, truth, name)

                a.case("persist", name, run, "either" if _harmless(field_path) else "error")
    for junk in (
        "not json",
        "[]",
        "null",
        '{"format": "kvpack-cache"}',
        "[" * 100000,
        '{"a": ' * 5000 + "1" + "}" * 5000,
    ):

        def run(junk=junk):
            from safetensors.torch import save_file

            save_file(tensors, str(path), metadata={"kvpack": junk})
            return _load_compare(model, path, truth, "junk header")

        a.case("persist", f"[{pname}] header replaced by {junk[:20]!r}...", run)


def _harmless(field_path) -> bool:
    return field_path[:2] == ("model", "model_id")  # the name is checked only when load_cache gets model_id


def byte_cases(a: Attack, pname: str, model, path: Path, truth) -> None:
    raw = path.read_bytes()
    target = TMP / "bytes.safetensors"
    head = int.from_bytes(raw[:8], "little") + 8
    for _ in range(12):
        pos = a.rng.randrange(len(raw))
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << a.rng.randrange(8)
        where = "header" if pos < head else "data"

        def run(b=bytes(flipped)):
            target.write_bytes(b)
            return _load_compare(model, target, truth, "byte flip")

        a.case("persist", f"[{pname}] byte flip at {pos} ({where})", run, "either")
    for cut in (0, 4, 8, head - 1, head, head + 1, len(raw) // 2, len(raw) - 1):

        def run(b=raw[:cut]):
            target.write_bytes(b)
            return _load_compare(model, target, truth, "truncated")

        a.case("persist", f"[{pname}] truncated to {cut} bytes", run)
    a.case(
        "persist",
        f"[{pname}] appended garbage",
        lambda: (target.write_bytes(raw + b"\0" * 64), _load_compare(model, target, truth, "appended"))[1],
        "either",
    )


def tensor_cases(a: Attack, pname: str, model, header: dict, tensors: dict, truth) -> None:
    path = TMP / "tensors.safetensors"
    names = sorted(tensors)
    picks = a.rng.sample(names, min(8, len(names)))
    for name in picks:
        t = tensors[name]
        variants = {
            "dropped": {k: v for k, v in tensors.items() if k != name},
            "one row cut": {**tensors, name: t[..., :-1, :].contiguous() if t.dim() > 1 else t[:-1]},
            "reshaped flat": {**tensors, name: t.reshape(-1).contiguous()},
            "as float32": {**tensors, name: t.float()},
            "doubled batch": {**tensors, name: torch.cat([t, t]) if t.dim() else t},
        }
        if t.dtype in (torch.float16, torch.bfloat16):
            variants["float16<->bfloat16 bytes"] = {
                **tensors,
                name: t.view(torch.bfloat16 if t.dtype == torch.float16 else torch.float16),
            }
        for vname, tens in variants.items():
            for rechecksum in (False, True):

                def run(tens=tens, rechecksum=rechecksum):
                    write_file(path, header, tens, rechecksum)
                    return _load_compare(model, path, truth, "tensor edit")

                a.case("persist", f"[{pname}] tensor {name} {vname}" + (" (re-checksummed)" if rechecksum else ""), run)
    extra = {**tensors, "layers.0.extra": torch.zeros(3)}
    a.case("persist", f"[{pname}] extra tensor (re-checksummed)",
           lambda: (write_file(path, header, extra, True), _load_compare(model, path, truth, "extra"))[1])  # fmt: skip


def api_cases(a: Attack, model, policies) -> None:
    from transformers import DynamicCache, LlamaConfig

    from kvpack import CachePolicy, KVPackCache, load_cache, save_cache

    policy = policies["int4/turbo3 block 8"]
    cache = filled_cache(model, policy, a.seed)
    path = TMP / "api.safetensors"
    save_cache(cache, path, config=model.config)
    other = LlamaConfig(vocab_size=128, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                        num_hidden_layers=3, intermediate_size=128)  # fmt: skip
    fewer = LlamaConfig(vocab_size=128, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                        num_hidden_layers=2, intermediate_size=128)  # fmt: skip
    cases = {
        "config=None": lambda: load_cache(path, config=None),
        "config a dict": lambda: load_cache(path, config={"num_hidden_layers": 3}),
        "config of 2 KV heads": lambda: load_cache(path, config=other),
        "config of 2 layers": lambda: load_cache(path, config=fewer),
        "config the model": lambda: load_cache(path, config=model),
        "policy another": lambda: load_cache(path, config=model.config, policy=CachePolicy(key="int:2")),
        "policy a dict": lambda: load_cache(path, config=model.config, policy={"key": "int:4"}),
        "model_id mismatch": lambda: load_cache(path, config=model.config, model_id="other/model"),
        "device bogus": lambda: load_cache(path, config=model.config, device="bogus"),
        "device 42.5": lambda: load_cache(path, config=model.config, device=42.5),
        "device meta": lambda: load_cache(path, config=model.config, device="meta"),
        "path a directory": lambda: load_cache(TMP, config=model.config),
        "path missing": lambda: load_cache(TMP / "missing.safetensors", config=model.config),
        "path None": lambda: load_cache(None, config=model.config),
        "path an int": lambda: load_cache(3, config=model.config),
        "path a policy file": lambda: load_cache(_policy_file(), config=model.config),
        "save a DynamicCache": lambda: save_cache(DynamicCache(), TMP / "d.safetensors", config=model.config),
        "save without config": lambda: save_cache(cache, TMP / "d.safetensors"),
        "save to a directory": lambda: save_cache(cache, TMP, config=model.config),
        "save under a file": lambda: save_cache(cache, path / "x.safetensors", config=model.config),
        "save to missing dir": lambda: save_cache(cache, TMP / "no" / "x.safetensors", config=model.config),
        "save path None": lambda: save_cache(cache, None, config=model.config),
        "save config=model": lambda: save_cache(cache, TMP / "m.safetensors", config=model),
        "save config a dict": lambda: save_cache(cache, TMP / "m.safetensors", config={}),
        "save model_id 3": lambda: save_cache(cache, TMP / "m.safetensors", config=model.config, model_id=3),
    }
    for name, fn in cases.items():
        a.case(
            "persist",
            f"api {name}",
            lambda fn=fn: fn() and "correct",
            "either" if name in ("config the model",) else "error",
        )
    empty = KVPackCache(config=model.config, policy=policy)
    a.case("persist", "api save/load an empty cache",
           lambda: (save_cache(empty, TMP / "e.safetensors", config=model.config), load_cache(TMP / "e.safetensors", config=model.config).get_seq_length() == 0 or _raise("empty cache loaded with tokens"))[1] and "correct", "ok")  # fmt: skip
    for wd in (torch.bfloat16, torch.float32, torch.float16):
        p = CachePolicy(key="int:4", value="int:4", residual=8, block=8, window_dtype=wd)
        c = filled_cache(model, p, a.seed)
        t = next_logits(model, copy.deepcopy(c))
        a.case("persist", f"api round trip window_dtype={wd}",
               lambda c=c, t=t: (save_cache(c, TMP / "w.safetensors", config=model.config), _load_compare(model, TMP / "w.safetensors", t, "window_dtype"))[1], "ok")  # fmt: skip


def _raise(msg):
    raise Wrong(msg)


def _policy_file() -> Path:
    from kvpack import CachePolicy, save_policy

    p = TMP / "policy.json"
    save_policy(CachePolicy(key="int:4"), p)
    return p


SAVE_LOOP = r"""
import sys, torch
sys.path[:0] = {paths!r}
import attack_io
from kvpack import CachePolicy, save_cache
model = attack_io.tiny()
cache = attack_io.filled_cache(model, CachePolicy(key="int:4", value="int:4", residual=8, block=8), 0, batch=64)
print("ready", flush=True)
while True:
    save_cache(cache, {path!r}, config=model.config)
"""


def interrupted_cases(a: Attack, model, policy) -> None:
    from kvpack import load_cache, save_cache
    from kvpack.hf import persist

    cache = filled_cache(model, policy, a.seed)
    truth = next_logits(model, copy.deepcopy(cache))
    path = TMP / "interrupted.safetensors"
    save_cache(cache, path, config=model.config)
    tmp = persist._temp_path(path)
    for what, target in (("save_file", "save_file"), ("os.fsync", "os.fsync"), ("os.replace", "os.replace")):

        def run(target=target, what=what):
            def boom(*args, **kwargs):
                if target == "save_file":
                    Path(args[1]).write_bytes(b"partial")
                raise KeyboardInterrupt

            mod, attr = (persist, "save_file") if target == "save_file" else (persist.os, target.split(".")[1])
            saved = getattr(mod, attr)
            setattr(mod, attr, boom)
            try:
                save_cache(cache, path, config=model.config)
            except KeyboardInterrupt:
                pass
            finally:
                setattr(mod, attr, saved)
            if tmp.exists():
                raise Wrong(f"interrupted in {what}: temporary file {tmp.name} left behind")
            return _load_compare(model, path, truth, f"after an interrupted save ({what})")

        a.case("persist", f"interrupted save ({what}): old file whole, no temp", run, "ok")
    tmp.write_bytes(b"leftover of a killed save")

    def leftover():
        _load_compare(model, path, truth, "with a leftover temp")
        if tmp.exists():
            raise Wrong("load left the temporary file of a killed save")
        return "correct"

    a.case("persist", "leftover temp removed by load", leftover, "ok")
    paths = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]
    kill_path = TMP / "killed.safetensors"
    for delay in (0.05, 0.2, 0.5):
        proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP.format(paths=paths, path=str(kill_path))],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        proc.stdout.readline()
        time.sleep(delay + a.rng.random() * 0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        def after_kill():
            if kill_path.exists():  # a whole file of the last finished save
                load_cache(kill_path, config=model.config)
            if persist._temp_path(kill_path).exists():
                save_cache(cache, kill_path, config=model.config)
                if persist._temp_path(kill_path).exists():
                    raise Wrong("a save after a killed save left its temporary file")
            return "correct"

        a.case("persist", f"save killed after {delay} s: target whole, temp cleaned by the next save", after_kill, "ok")


# ---- policies -------------------------------------------------------------------------------------------------

BAD_FIELDS = {
    "key": [1, "", "nope", "int:9", "int:4:axis=bogus", b"int:4", ["int:4"], "calibrated:3", "e8:3", "polar:3",
            "int:4:group=64", "qjl"],
    "value": [0.5, "turbo_mse:9", "int:4:axis=channel,group=5", "outlier_sparse:4:count=40"],
    "residual": [-1, 1.5, "8", True, None, 10**30, 0],
    "sinks": [-2, 2.0, "4", None, 10**30, 0],
    "skip_layers": [5, "0", [-1], [0.5], [99], {0: 1}, [True], None, [0, 1, 2]],
    "block": [0, -1, 3, 1.0, "32", True, 7, 10**9],
    "seed": [-1, 2**64, 2**63, 1.5, "0", None, True],
    "window_dtype": [torch.int8, torch.float8_e4m3fn, "float16", torch.complex64, torch.float64, torch.bool, 16],
    "layer_keys": ["int:4", [1], [""], ["bogus"], [None] * 10, [None], ["int:4", "fp8", "e8:2"]],
    "layer_values": [["int:9"], [b"x"], (None, None, None, None)],
    "fp_heads": [[(0, 5)], [(9, 0)], {0: 5}, {0: [1]}, [(0,)], [(-1, 0)], "x", [[0, 0.5]], 5, [(0, 0)]],
    "pre_rope_keys": [1, "yes", None, True],
    "head_keys": [["int:4"], [["int:4", "int:4"]], [[]], [[1]], "x", [None], [["int:4"]], [["bogus"]]],
    "head_values": [[["int:2", None]], [{"a": 1}], [["int:4"], ["int:3"], ["fp8"], ["int:2"]]],
}  # fmt: skip


def policy_cases(a: Attack) -> None:
    from kvpack import CachePolicy, KVPackCache

    model = tiny()
    base = {"key": "int:4", "value": "int:4", "residual": 8, "sinks": 2}
    for field, values in BAD_FIELDS.items():
        for value in values:
            fields = {**base, field: value}
            name = f"CachePolicy({field}={value!r})"

            def run(fields=fields):
                policy = CachePolicy(**fields)
                try:
                    cache = KVPackCache(config=model.config, policy=policy)
                except (ValueError, TypeError, NotImplementedError) as exc:
                    raise ValueError(f"at KVPackCache: {exc}") from exc
                try:
                    with torch.no_grad():
                        out = model(prompt_ids(1), past_key_values=cache, use_cache=True).logits
                        out2 = model(torch.tensor([[3]]), past_key_values=cache, use_cache=True).logits
                except (ValueError, TypeError, NotImplementedError) as exc:
                    raise Late(f"mid-forward: {type(exc).__name__}: {exc}") from None
                finite(out, "logits")
                finite(out2, "next logits")
                return "correct"

            a.case("policy", name, run, "either")
    policy_file_cases(a, model)


def policy_file_cases(a: Attack, model) -> None:
    from kvpack import CachePolicy, load_policy, save_policy

    path = TMP / "p.json"
    good = {"format": "kvpack-policy", "version": 1, "policy": {"key": "int:4", "value": "turbo_mse:3"}}
    docs = {
        "not JSON": "{key: int}",
        "truncated": json.dumps(good)[:-5],
        "a list": "[]",
        "null": "null",
        "format missing": json.dumps({**good, "format": None}),
        "version 2": json.dumps({**good, "version": 2}),
        "version '1'": json.dumps({**good, "version": "1"}),
        "policy a list": json.dumps({**good, "policy": []}),
        "policy 5": json.dumps({**good, "policy": 5}),
        "policy null": json.dumps({**good, "policy": None}),
        "unknown field": json.dumps({**good, "policy": {"keys": "int:4"}}),
        "deep nesting": '{"format": "kvpack-policy", "version": 1, "policy": {"skip_layers": '
        + "[" * 50000
        + "]" * 50000
        + "}}",
        "huge int": '{"format": "kvpack-policy", "version": 1, "policy": {"residual": ' + "9" * 5000 + "}}",
        "NaN residual": '{"format": "kvpack-policy", "version": 1, "policy": {"residual": NaN}}',
        "Infinity block": '{"format": "kvpack-policy", "version": 1, "policy": {"block": Infinity}}',
        "window_dtype int8": json.dumps({**good, "policy": {"window_dtype": "int8"}}),
        "window_dtype float8": json.dumps({**good, "policy": {"window_dtype": "float8_e4m3fn"}}),
        "window_dtype finfo": json.dumps({**good, "policy": {"window_dtype": "finfo"}}),
        "window_dtype __class__": json.dumps({**good, "policy": {"window_dtype": "__class__"}}),
        "window_dtype 16": json.dumps({**good, "policy": {"window_dtype": 16}}),
        "window_dtype list": json.dumps({**good, "policy": {"window_dtype": ["float16"]}}),
        "fp_heads dict with str keys": json.dumps({**good, "policy": {"fp_heads": {"0": [0]}}}),
        "skip_layers dict": json.dumps({**good, "policy": {"skip_layers": {"0": 1}}}),
        "head_keys string": json.dumps({**good, "policy": {"head_keys": "int:4"}}),
        "layer_keys number": json.dumps({**good, "policy": {"layer_keys": 4}}),
        "pre_rope_keys 'true'": json.dumps({**good, "policy": {"pre_rope_keys": "true"}}),
        "seed 2**64": json.dumps({**good, "policy": {"seed": 2**64}}),
        "binary": b"\xff\xfe\x00garbage",
        "empty": "",
        "BOM": "\ufeff" + json.dumps(good),
    }
    for name, text in docs.items():

        def run(text=text):
            path.write_bytes(text if isinstance(text, bytes) else text.encode())
            load_policy(path)
            return "correct"

        a.case("policy", f"policy file {name}", run, "either" if name == "BOM" else "error")
    for name, fn in {
        "load a directory": lambda: load_policy(TMP),
        "load missing": lambda: load_policy(TMP / "none.json"),
        "load None": lambda: load_policy(None),
        "save to a directory": lambda: save_policy(CachePolicy(), TMP),
        "save under a file": lambda: save_policy(CachePolicy(), path / "x.json"),
        "save a dict": lambda: save_policy({"key": "int:4"}, TMP / "d.json"),
        "save with info a tensor": lambda: save_policy(CachePolicy(), TMP / "i.json", note=torch.zeros(1)),
        "save with info key 'format'": lambda: save_policy(CachePolicy(), TMP / "i.json", format=3),
    }.items():
        a.case("policy", f"policy file {name}", lambda fn=fn: fn() and "correct", "error")
    roundtrips = [CachePolicy(window_dtype=torch.bfloat16), CachePolicy(key="int:4", fp_heads={0: (0,)}, head_keys=(("int:2",),)),
                  CachePolicy(key=None, value="e8:3", skip_layers=(2, 0), layer_keys=("int:4", None), pre_rope_keys=True, seed=2**63 - 1)]  # fmt: skip
    for i, p in enumerate(roundtrips):

        def run(p=p):
            save_policy(p, path)
            back = load_policy(path)
            if back != p:
                raise Wrong(f"policy file round trip changed the policy: {back} != {p}")
            return "correct"

        a.case("policy", f"policy file round trip {i}", run, "ok")


# ---- the cache API --------------------------------------------------------------------------------------------


def cache_cases(a: Attack) -> None:
    from kvpack import CachePolicy, KVPackCache

    model = tiny()
    cfg = model.config
    g = torch.Generator().manual_seed(a.seed)
    policy = CachePolicy(key="fp16", value="fp16", residual=4, sinks=2, block=4)  # exact: past == the input in fp16

    def fresh():
        return KVPackCache(config=cfg, policy=policy)

    def filled(n=17, batch=3):
        c = fresh()
        k = torch.randn(batch, 1, n, 32, generator=g).half().float()
        v = torch.randn(batch, 1, n, 32, generator=g).half().float()
        for i in range(3):
            c.update(k, v, i)
        return c, k, v

    k = torch.randn(1, 1, 5, 32, generator=g)
    upd = {
        "K 5 tokens, V 4": (k, k[:, :, :4]),
        "V float16, K float32": (k, k.half()),
        "K int": (k.int(), k.int()),
        "K 3-D": (k[0], k[0]),
        "K a list": (k.tolist(), k),
        "V None": (k, None),
        "K NaN": (_set(k, (0, 0, 0, 0), float("nan")), k),
        "V Inf": (k, _set(k, (0, 0, 1, 1), float("inf"))),
        "K 1e5 (float32 model)": (_set(k, (0, 0, 1, 1), 1e5), k),
        "K 2 KV heads (model: 1)": (k.expand(1, 2, 5, 32).contiguous(),) * 2,
        "K head_dim 64 (model: 32)": (torch.randn(1, 1, 5, 64),) * 2,
        "K 0 tokens": (k[:, :, :0],) * 2,
        "K on meta": (k.to("meta"),) * 2,
        "K complex": (k.to(torch.complex64),) * 2,
    }
    for name, (kk, vv) in upd.items():

        def run(kk=kk, vv=vv, name=name):
            c = fresh()
            keys, values = c.update(kk, vv, 0)
            for _ in range(3):  # age the tokens into packed blocks: a late failure shows here
                try:
                    keys, values = c.update(kk, vv, 0)
                except (ValueError, TypeError) as exc:
                    raise Late(f"a later update: {exc}") from None
            finite(keys, "keys")
            finite(values, "values")
            return "correct"

        a.case(
            "cache",
            f"update {name}",
            run,
            "either" if name in ("K 0 tokens", "K 2 KV heads (model: 1)", "K head_dim 64 (model: 32)") else "error",
        )
    later = {"batch 2 then 1": (torch.randn(2, 1, 3, 32), torch.randn(1, 1, 3, 32)),
             "float32 then float16": (torch.randn(1, 1, 3, 32), torch.randn(1, 1, 3, 32).half()),
             "head_dim 32 then 64": (torch.randn(1, 1, 3, 32), torch.randn(1, 1, 3, 64))}  # fmt: skip
    for name, (x1, x2) in later.items():
        a.case(
            "cache",
            f"update {name}",
            lambda x1=x1, x2=x2: (fresh().update(x1, x1, 0), None)[1] or _second(fresh, x1, x2),
        )
    for idx in (3, -1, -4, 1.0, "0", None, 10**9):
        a.case("cache", f"update layer_idx={idx!r}", lambda idx=idx: _update_layer(fresh(), k, idx), "error")
    select_cases(a, fresh, filled)
    paged_cases(a, model)


def _second(fresh, x1, x2):
    c = fresh()
    c.update(x1, x1, 0)
    c.update(x2, x2, 0)
    return "correct"


def _update_layer(cache, k, idx):
    cache.update(k, k, idx)
    if isinstance(idx, int) and not 0 <= idx < 3:
        raise Wrong(f"update(layer_idx={idx}) accepted for a 3-layer model")
    return "correct"


def _past(cache, layer=0):
    return cache.layers[layer].past()


def select_cases(a: Attack, fresh, filled) -> None:
    def check(op, ref_rows, n_keep=None):
        def run():
            c, k, v = filled()
            op(c)
            keys, values = _past(c)
            rk, rv = k[ref_rows], v[ref_rows]
            if n_keep is not None:
                rk, rv = rk[..., :n_keep, :], rv[..., :n_keep, :]
            same(keys.float(), rk, "keys")
            same(values.float(), rv, "values")
            return "correct"

        return run

    rows_ok = {"[2, 0]": [2, 0], "[1, 1, 1]": [1, 1, 1], "[0]": [0]}
    for name, rows in rows_ok.items():
        a.case(
            "cache",
            f"batch_select_indices {name}",
            check(lambda c, r=rows: c.batch_select_indices(torch.tensor(r)), rows),
            "ok",
        )
        a.case("cache", f"reorder_cache {name}", check(lambda c, r=rows: c.reorder_cache(torch.tensor(r)), rows), "ok")
    a.case(
        "cache",
        "batch_select_indices bool mask",
        check(lambda c: c.batch_select_indices(torch.tensor([True, False, True])), [0, 2]),
        "ok",
    )
    bad = {"[3]": torch.tensor([3]), "[-1]": torch.tensor([-1]), "[-4]": torch.tensor([-4]), "float": torch.tensor([0.5]),
           "2-D": torch.tensor([[0, 1]]), "bool mask of 2": torch.tensor([True, False]), "list [0, 5]": [0, 5],
           "None": None, "empty": torch.tensor([], dtype=torch.long), "string": "0"}  # fmt: skip
    for name, idx in bad.items():
        for op in ("batch_select_indices", "reorder_cache"):

            def run(idx=idx, op=op, name=name):
                c, k, _ = filled()
                getattr(c, op)(idx)
                keys, _ = _past(c)
                finite(keys, "keys")
                rows = torch.as_tensor(idx)
                rows = rows.nonzero().flatten() if rows.dtype == torch.bool else rows
                same(keys.float(), k[rows.long()], f"{op}({name})")  # negative rows: python-style wrap as truth
                return "correct"

            a.case("cache", f"{op} {name}", run, "either" if name in ("empty",) else "error")
        a.case(
            "cache",
            f"batch_select_indices {name} on a fresh cache",
            lambda idx=idx: fresh().batch_select_indices(idx) or "correct",
            "either",
        )
        a.case(
            "cache",
            f"reorder_cache {name} on a fresh cache",
            lambda idx=idx: fresh().reorder_cache(idx) or "correct",
            "either",
        )
    for n in (0, -1, -3, -4, -6, -100, 1, 1.5, True, None, "1"):

        def run(n=n):
            c, k, _ = filled()
            c.layers[0].crop(n)
            keys, _ = _past(c)
            return same(keys.float(), k[..., : 17 + n, :], f"layer crop({n})")

        a.case(
            "cache",
            f"layer crop({n!r})",
            run,
            "either" if isinstance(n, int) and not isinstance(n, bool) and -3 <= n <= 0 else "error",
        )
    for n in (10, 16, 17, 20, -2, 0, 2.5):

        def run(n=n):
            c, k, _ = filled()
            c.crop(n)  # kvpack's documented semantics: n <= 0 drops -n tokens (transformers': n >= 0 keeps n)
            keep = 17 + n if n <= 0 else n
            keys, _ = _past(c)
            return same(keys.float(), k[..., :keep, :], f"cache crop({n})")

        a.case("cache", f"cache.crop({n!r})", run, "either")
    for r in (2, 1, 0, -1, 1.5, "2"):

        def run(r=r):
            c, k, _ = filled()
            c.batch_repeat_interleave(r)
            keys, _ = _past(c)
            return same(keys.float(), k.repeat_interleave(r, 0), f"repeat({r})")

        a.case("cache", f"batch_repeat_interleave({r!r})", run, "ok" if r in (1, 2) else "error")
    for name, fn in {"nbytes('x')": lambda c: c.nbytes("x"), "bits_per_value(stream=1)": lambda c: c.bits_per_value(1),
                     "get_seq_length(7)": lambda c: c.get_seq_length(7), "get_seq_length(-1)": lambda c: c.get_seq_length(-1)}.items():  # fmt: skip
        a.case("cache", name, lambda fn=fn: (fn(filled()[0]), "correct")[1], "either")
    from kvpack import KVPackCache

    for name, kwargs in {"config None": {"config": None}, "config a dict": {"config": {"num_hidden_layers": 3}},
                         "key bogus": {"key": "bogus"}, "residual -1": {"residual": -1}, "policy a dict": {"policy": {}},
                         "skip_layers 7": {"skip_layers": (7,)}, "skip_layers None": {"skip_layers": None}}.items():  # fmt: skip
        cfg = fresh().layers and _cfg_of(fresh)
        a.case(
            "cache",
            f"KVPackCache({name})",
            lambda kwargs=kwargs, cfg=cfg: KVPackCache(**{"config": cfg, **kwargs}) and None,
        )


def _cfg_of(fresh):
    from tiny_models import tiny_model

    return tiny_model("llama").config


def paged_cases(a: Attack, model) -> None:
    from kvpack import CachePolicy, KVPackCache, PagedKVPackCache, use_paged_attention

    policy = CachePolicy(key="int:4", value="turbo_mse:3", residual=8, sinks=2, block=16)
    a.case(
        "cache",
        "PagedKVPackCache without use_paged_attention",
        lambda: PagedKVPackCache(model.config, policy=policy) and None,
    )
    paged_model = copy.deepcopy(model)
    use_paged_attention(paged_model)
    ids = prompt_ids(3, n=50, batch=2)

    def logits(m, cache, steps=3):
        out = []
        with torch.no_grad():
            out.append(m(ids, past_key_values=cache, use_cache=True).logits[:, -1])
            for s in range(steps):
                out.append(m(torch.full((2, 1), 7 + s), past_key_values=cache, use_cache=True).logits[:, -1])
        return torch.stack(out)

    truth = logits(model, KVPackCache(config=model.config, policy=policy))
    a.case("cache", "PagedKVPackCache equals KVPackCache (decode_ref)",
           lambda: same(logits(paged_model, PagedKVPackCache(paged_model.config, policy=policy, use_kernel=False)), truth, "paged", 1e-3, 1e-3), "ok")  # fmt: skip
    a.case(
        "cache",
        "PagedKVPackCache(use_kernel='yes')",
        lambda: PagedKVPackCache(paged_model.config, policy=policy, use_kernel="yes") and None,
    )
    for name, op in {"batch_select_indices [1]": lambda c: c.batch_select_indices(torch.tensor([1])),
                     "batch_select_indices [5]": lambda c: c.batch_select_indices(torch.tensor([5])),
                     "batch_select_indices [-1]": lambda c: c.batch_select_indices(torch.tensor([-1])),
                     "reorder_cache [1, 0]": lambda c: c.reorder_cache(torch.tensor([1, 0])),
                     "reorder_cache [0, 2]": lambda c: c.reorder_cache(torch.tensor([0, 2])),
                     "crop(-1)": lambda c: c.layers[0].crop(-1), "crop(-40)": lambda c: c.layers[0].crop(-40),
                     "crop(3)": lambda c: c.layers[0].crop(3),
                     "update K 4 tokens V 3": lambda c: c.update(torch.randn(2, 1, 4, 32), torch.randn(2, 1, 3, 32), 0),
                     "update batch 3": lambda c: c.update(torch.randn(3, 1, 4, 32), torch.randn(3, 1, 4, 32), 0),
                     "update NaN": lambda c: c.update(torch.full((2, 1, 4, 32), float("nan")), torch.randn(2, 1, 4, 32), 0),
                     "batch_repeat_interleave(2)": lambda c: c.batch_repeat_interleave(2)}.items():  # fmt: skip

        def run(op=op, name=name):
            c = PagedKVPackCache(paged_model.config, policy=policy, use_kernel=False)
            with torch.no_grad():
                paged_model(ids, past_key_values=c, use_cache=True)
            op(c)
            ref = KVPackCache(config=model.config, policy=policy)
            with torch.no_grad():
                model(ids, past_key_values=ref, use_cache=True)
            op(ref)
            try:
                with torch.no_grad():
                    b = c.layers[0].keys.shape[0] if hasattr(c.layers[0], "keys") else 2
                    y = paged_model(torch.full((b, 1), 9), past_key_values=c, use_cache=True).logits
                    t = model(torch.full((b, 1), 9), past_key_values=ref, use_cache=True).logits
            except (ValueError, TypeError) as exc:
                raise Late(f"next forward: {exc}") from None
            return same(y, t, name, 1e-3, 1e-3)

        expect = (
            "ok"
            if name in ("batch_select_indices [1]", "reorder_cache [1, 0]", "crop(-1)", "batch_repeat_interleave(2)")
            else "error"
        )
        a.case("cache", f"PagedKVPackCache {name}", run, expect)


def _set(x, index, value):
    y = x.clone()
    y[index] = value
    return y


# ---- the CLI --------------------------------------------------------------------------------------------------


def tiny_model_dir() -> Path:
    """The tiny Llama saved with a character-level tokenizer: a local model directory the CLI loads offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = TMP / "tiny-llama"
    vocab = {chr(i): i for i in range(32, 127)} | {"<unk>": 0, "<eos>": 1, "\n": 10}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    tiny().save_pretrained(folder)
    return folder


def run_cli(argv: list[str], blocked: tuple[str, ...] = ()) -> tuple[int | str, str]:
    """``kvpack.cli.main(argv)`` in-process: (exit status or 'exception: ...', stderr)."""
    from kvpack import cli

    err, out = io.StringIO(), io.StringIO()
    saved = {m: sys.modules.get(m) for m in blocked}
    for m in blocked:
        sys.modules[m] = None  # import raises ImportError: a missing optional package
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = cli.main(argv)
    except SystemExit as exc:
        rc = f"SystemExit {exc.code} escaped main"
    except BaseException as exc:  # noqa: BLE001
        rc = f"exception {type(exc).__name__}: {exc}"
    finally:
        for m, mod in saved.items():
            if mod is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = mod
    return rc, err.getvalue()


def classify_cli(rc, stderr: str, expect: str) -> tuple[str, str]:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if "Traceback" in stderr or isinstance(rc, str):
        return "crash", f"{rc}: traceback" if "Traceback" in stderr else str(rc)
    if rc == 0:
        return ("correct" if expect != "error" else "silent_wrong"), last
    if rc == 2 and last.startswith("kvpack") and "error:" in last:
        return ("false_error" if expect == "ok" else "clear"), last
    return "crash", f"exit {rc}: {last}"


def cli_cases(a: Attack) -> None:
    folder = tiny_model_dir()
    text = TMP / "text.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog. " * 200) + "\n")
    empty = TMP / "empty.txt"
    empty.write_text("")
    binary = TMP / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    notdir = TMP / "afile"
    notdir.write_text("x")
    cfg_json = folder / "config.json"
    lst = TMP / "list.json"
    lst.write_text("[1, 2]")
    m, t = ["--model", str(folder)], ["--text", str(text)]
    fast_eval = [
        *m,
        *t,
        "--ctx",
        "96",
        "--n-eval",
        "8",
        "--windows",
        "1",
        "--no-progress",
        "--residual",
        "8",
        "--block",
        "32",
    ]
    fast_inspect = [*m, *t, "--ctx", "96", "--windows", "1"]
    cases: list[tuple[list[str], str, tuple]] = [
        ([], "error", ()), (["nosuch"], "error", ()), (["--bogus"], "error", ()),
        (["eval", *fast_eval], "ok", ()),
        (["eval", *fast_eval, "--json", str(TMP / "e.json")], "ok", ()),
        (["eval", *fast_eval, "--key", "turbo_prod:3", "--value", "e8:3", "--protocol", "snapshot"], "ok", ()),
        (["eval", *fast_eval, "--json", str(TMP)], "error", ()),
        (["eval", *fast_eval, "--json", str(notdir / "x.json")], "error", ()),
        (["eval", *fast_eval, "--json", "/proc/x.json"], "error", ()),
        (["eval", *fast_eval, "--json", str(TMP / "nodir" / "x.json")], "error", ()),
        (["eval", *fast_eval, "--ctx", "100000"], "error", ()),
        (["eval", *fast_eval, "--ctx", "0"], "error", ()),
        (["eval", *fast_eval, "--ctx", "-5"], "error", ()),
        (["eval", *fast_eval, "--ctx", "abc"], "error", ()),
        (["eval", *fast_eval, "--n-eval", "0"], "error", ()),
        (["eval", *fast_eval, "--windows", "0"], "error", ()),
        (["eval", *fast_eval, "--windows", "1000"], "error", ()),
        (["eval", *fast_eval, "--residual", "-1"], "error", ()),
        (["eval", *fast_eval, "--block", "0"], "error", ()),
        (["eval", *fast_eval, "--sinks", "1e9"], "error", ()),
        (["eval", *fast_eval, "--seed", "-1"], "error", ()),
        (["eval", *fast_eval, "--key", "bogus"], "error", ()),
        (["eval", *fast_eval, "--key", "int:4:axis=channel,group=5"], "error", ()),
        (["eval", *fast_eval, "--skip-layers", "9"], "error", ()),
        (["eval", *fast_eval, "--skip-layers", "x"], "error", ()),
        (["eval", *fast_eval, "--preset", "bogus"], "error", ()),
        (["eval", *fast_eval, "--policy", str(TMP / "none.json")], "error", ()),
        (["eval", *fast_eval, "--policy", str(lst)], "error", ()),
        (["eval", *fast_eval, "--policy", str(TMP)], "error", ()),
        (["eval", *fast_eval, "--only", "x"], "error", ()),
        (["eval", *fast_eval, "--protocol", "x"], "error", ()),
        (["eval", *fast_eval, "--bogus"], "error", ()),
        (["eval", "--model", "nosuchmodel", *t], "error", ()),
        (["eval", "--model", "org/nosuchmodel", *t], "error", ()),
        (["eval", "--model", "/nonexistent/dir", *t], "error", ()),
        (["eval", "--model", str(TMP / "x.gguf"), *t], "error", ()),
        (["eval", "--model", str(TMP), *t], "error", ()),
        (["eval", "--model", str(cfg_json), *t], "error", ()),
        (["eval", *m, "--text", str(TMP / "none.txt")], "error", ()),
        (["eval", *m, "--text", str(empty), "--ctx", "48", "--n-eval", "8"], "error", ()),
        (["eval", *m, "--text", str(binary), "--ctx", "48", "--n-eval", "8", "--windows", "1"], "either", ()),
        (["eval", *m, "--text", str(TMP), "--ctx", "48"], "error", ()),
        (["sweep", *fast_eval[:-4], "--key", "int:4", "int:2", "--residual", "8", "--json", str(TMP / "s.json")], "ok", ()),
        (["sweep", *fast_eval[:-4], "--peers", "quanto:4"], "error", ("optimum", "optimum.quanto")),
        (["sweep", *fast_eval[:-4], "--peers", "hqq:4"], "error", ("hqq",)),
        (["sweep", *fast_eval[:-4], "--peers", "bogus:4"], "error", ()),
        (["sweep", *fast_eval[:-4], "--plot", str(TMP / "p.png")], "error", ("matplotlib", "matplotlib.pyplot")),
        (["sweep", *fast_eval[:-4], "--config", str(lst)], "error", ()),
        (["sweep", *fast_eval[:-4], "--config", str(binary)], "error", ()),
        (["sweep", *fast_eval[:-4], "--csv", str(TMP)], "error", ()),
        (["sweep", *fast_eval[:-4], "--markdown", str(notdir / "m.md")], "error", ()),
        (["sweep", *fast_eval[:-4], "--device", "bogus"], "error", ()),
        (["sweep", *fast_eval[:-4], "--block", "x"], "error", ()),
        (["needle", *m, "--lengths", "64", "--depths", "50", "--trials", "1", "--no-progress", "--residual", "8", "--block", "8"], "either", ()),
        (["needle", *m, "--lengths", "x"], "error", ()),
        (["needle", *m, "--lengths", "-5"], "error", ()),
        (["needle", *m, "--depths", "150"], "error", ()),
        (["needle", *m, "--trials", "0"], "error", ()),
        (["needle", *m, "--plot", str(TMP)], "error", ()),
        (["inspect", *fast_inspect, "--codecs", "int:4", "--no-progress"], "ok", ()),
        (["inspect", *fast_inspect, "--codecs", "bogus"], "error", ()),
        (["inspect", *fast_inspect, "--codecs", "int:4/"], "error", ()),
        (["inspect", *fast_inspect, "--codecs", ""], "error", ()),
        (["inspect", *fast_inspect, "--sinks", "-1"], "error", ()),
        (["validate", "--codecs", "bogus"], "error", ()),
        (["validate", "--codecs", "int:4", "--head-dims", "0"], "error", ()),
        (["validate", "--codecs", "int:4", "--head-dims", "x"], "error", ()),
        (["validate", "--codecs", "int:4", "--head-dims", "32", "-n", "0"], "error", ()),
        (["validate", "--codecs", "int:4", "--head-dims", "32", "-n", "64", "--no-speed", "--no-progress"], "ok", ()),
        (["validate", "--codecs", "int:4", "--head-dims", "24", "-n", "64", "--no-speed"], "either", ()),
        (["validate", "--codecs", "e8:3", "--head-dims", "24", "-n", "64", "--no-speed"], "either", ()),
        (["validate", "--json", str(TMP)], "error", ()),
        (["bench", "--contexts", "x"], "error", ()),
        (["bench", "--contexts", "128", "--batches", "1", "--codecs", "int:4"], "error", ()),  # no GPU: one line
        (["bench", "--head-dim", "0"], "error", ()),
        (["bench", "--json", str(TMP)], "error", ()),
        (["calibrate", *m, *t, "--windows", "0"], "error", ()),
        (["calibrate", *m, *t, "--bits", "9"], "error", ()),
        (["calibrate", *m, *t, "--dir", str(notdir)], "error", ()),
        (["calibrate", "--name", "../../x", *m, *t], "error", ()),
        (["allocate", *m, *t, "--budget", "-1"], "error", ()),
        (["allocate", *m, *t, "--budget", "x"], "error", ()),
        (["allocate", *m, *t, "--candidates", "bogus"], "error", ()),
        (["allocate", *m, *t, "--outlier-heads", "-1"], "error", ()),
        (["allocate", "--model", "nosuchmodel"], "error", ()),
        (["memory", "--model", str(lst)], "error", ()),
        (["memory", "--model", str(cfg_json)], "ok", ()),
        (["memory", "--model", "nosuch"], "error", ()),
        (["memory", "--model", str(binary)], "error", ()),
        (["memory", "--context", "-1"], "error", ()),
        (["memory", "--context", "x"], "error", ()),
        (["memory", "--batch", "0"], "error", ()),
    ]  # fmt: skip
    for argv, expect, blocked in cases:
        start = time.time()
        rc, stderr = run_cli(argv, blocked)
        outcome, detail = classify_cli(rc, stderr, expect)
        if expect == "either" and outcome == "silent_wrong":
            outcome = "correct"
        a.record("cli", " ".join(argv).replace(str(TMP), "$TMP") + (f" [without {blocked[0]}]" if blocked else ""),
                 outcome, f"{detail} ({time.time() - start:.1f} s)")  # fmt: skip
    subprocess_cases(a, folder, lst)


def subprocess_cases(a: Attack, folder: Path, lst: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for argv, expect in (([], "error"), (["--help"], "ok"), (["eval", "--help"], "ok"),
                         (["eval", "--model", "nosuchmodel"], "error"), (["eval", "--model", "someorg/nosuchmodel"], "error"),
                         (["memory", "--model", str(lst)], "error"), (["validate", "--codecs", "bogus"], "error"),
                         (["eval", "--model", str(folder), "--ctx", "x"], "error")):  # fmt: skip
        start = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "kvpack.cli", *argv],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        seconds = time.time() - start
        rc = proc.returncode
        if rc < 0:
            a.record("cli", "subprocess " + " ".join(argv), "death", f"signal {-rc}")
            continue
        outcome, detail = classify_cli(rc, proc.stderr, expect)
        if outcome == "clear" and seconds > 30:
            outcome, detail = "crash", f"{detail} but after {seconds:.0f} s"
        a.record(
            "cli", "subprocess " + " ".join(argv).replace(str(TMP), "$TMP"), outcome, f"{detail} ({seconds:.1f} s)"
        )
