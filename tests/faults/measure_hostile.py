"""The was/now figures of docs/reliability.md, measured against a live daemon of
whatever code is installed (run it on the old code and on the new one).
usage: python tests/faults/measure_hostile.py LABEL STORE OUTDIR
(STORE: a demo store, e.g. built by `python -m lastmile.models.demo STORE`)."""
import asyncio, json, shutil, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import aiohttp
from tests.conftest import start_tcp_daemon
from lastmile.appliance.client.api import LastmileClient

label, store_src, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
home = out / f"home-{label}"
shutil.rmtree(home, ignore_errors=True)
store = home / "store"
shutil.copytree(store_src, store)
(store / "bare-pt2").mkdir()
shutil.copy(store / "demo-mlp-ds" / "model.pt2", store / "bare-pt2" / "model.pt2")
d, port = start_tcp_daemon(home, store, "t" * 32, server_extra="max_concurrent_requests = 100")
pid = d.proc.pid
res = {}

def rss(p=pid):
    for line in open(f"/proc/{p}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
def libtorch():
    return "libtorch" in open(f"/proc/{pid}/maps").read()

async def watch_health(client, stop, box):
    while not stop.is_set():
        t = time.perf_counter(); await client.ready(); box[0] = max(box[0], time.perf_counter() - t)
        await asyncio.sleep(0.01)

async def raw(client, method, path, body):
    return await client._raw(method, path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})

async def main():
    async with LastmileClient(d.socket, timeout_s=120) as c, LastmileClient(d.socket) as h:
        await c.load("demo-lm"); await c.load("demo-mlp")
        # response amplification: the same output asked for 20 times
        body = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [8, 64], "data": [1] * 512}], "outputs": [{"name": "logits"}] * 20}
        r0 = rss(); stop = asyncio.Event(); box = [0.0]; w = asyncio.create_task(watch_health(h, stop, box))
        t = time.perf_counter(); st_, _, payload = await raw(c, "POST", "/v2/models/demo-lm/infer", body); el = time.perf_counter() - t
        stop.set(); await w
        res["item1_repeated_x20"] = dict(request_bytes=len(json.dumps(body)), status=st_, response_bytes=len(payload), seconds=round(el, 2),
                                          daemon_rss_mib=[round(r0), round(rss())], health_max_s=round(box[0], 3))
        # single (no repeat) JSON logits 8x64: status and size
        body1 = dict(body); body1["outputs"] = [{"name": "logits"}]
        st_, _, payload = await raw(c, "POST", "/v2/models/demo-lm/infer", body1)
        res["item1_single_8x64_json"] = dict(status=st_, response_bytes=len(payload))
        # zero-size dims with a huge batch
        body = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [4611686018427387904, 0], "data": []}]}
        st_, _, payload = await raw(c, "POST", "/v2/models/demo-lm/infer", body)
        res["item2_zero_huge"] = dict(status=st_, body=payload[:120].decode(errors="replace"), traceback_in_log="Traceback" in d.log_text())
        # a bare .pt2 listed: is the loop blocked, is torch mapped
        r0 = rss(); stop = asyncio.Event(); box = [0.0]; w = asyncio.create_task(watch_health(h, stop, box))
        t = time.perf_counter(); listing = await c.models(); first = time.perf_counter() - t
        await asyncio.sleep(3)
        t = time.perf_counter(); listing = await c.models(); second = time.perf_counter() - t
        stop.set(); await w
        row = [r for r in listing["store"] if r["name"] == "bare-pt2"][0]
        res["item3_bare_pt2"] = dict(first_listing_s=round(first, 3), later_listing_s=round(second, 3), health_max_s=round(box[0], 3),
                                     daemon_rss_mib=[round(r0), round(rss())], libtorch_mapped=libtorch(), inputs=row["inputs"], error=row["error"])
        # slow peers: 200 slow-body connections, max_concurrent_requests = 100
        ib = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}).encode()
        head = b"POST /v2/models/demo-mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(ib)
        conns = []
        lost = 0
        for _ in range(200):
            try:
                rd, wr = await asyncio.open_unix_connection(str(d.socket)); wr.write(head + ib[:5]); await wr.drain(); conns.append((rd, wr))
            except OSError:
                lost += 1
        await asyncio.sleep(1.0)
        statuses = [(await c._raw("POST", "/v2/models/demo-mlp/infer", data=ib))[0] for _ in range(20)]
        res["item4_200_slow_bodies"] = dict(infer_statuses={s: statuses.count(s) for s in set(statuses)}, slow_conns_lost=lost)
        for _, wr in conns: wr.close()
        # token guessing rate over TCP (loopback)
        async with aiohttp.ClientSession() as s:
            codes = []; t = time.perf_counter()
            while time.perf_counter() - t < 3:
                async with s.get(f"http://127.0.0.1:{port}/lm/v1/status", headers={"Authorization": "Bearer wrong-token-000000000"}) as r:
                    codes.append(r.status)
            el = time.perf_counter() - t
        lines = sum("denied tcp=" in l for l in d.log_text().splitlines())
        res["item6_guessing_3s"] = dict(requests=len(codes), per_s=round(len(codes) / el), tokens_compared_401=codes.count(401),
                                        refused_429=codes.count(429), warning_lines=lines)
        # a reload to a missing device
        pid0 = (await c.model("demo-mlp"))["runners"][0]["pid"]
        st_, _, payload = await raw(c, "POST", "/v2/repository/models/demo-mlp/load", {"parameters": {"device": "cuda"}})
        after = await c._raw("GET", "/lm/v1/models/demo-mlp")
        infer = (await c._raw("POST", "/v2/models/demo-mlp/infer", data=ib))[0]
        res["item7_load_cuda"] = dict(status=st_, body=payload[:200].decode(errors="replace"), model_after=after[0], infer_after=infer,
                                      same_runner=(json.loads(after[2]).get("runners") or [{}])[0].get("pid") == pid0 if after[0] == 200 else False)
        st_, _, payload = await raw(c, "POST", "/v2/repository/models/demo-mlp/load", {"parameter": {"max_batch_size": 2}})
        res["item10_unknown_key"] = dict(status=st_, body=payload[:150].decode(errors="replace"))

try:
    asyncio.run(main())
finally:
    d.stop()
(out / f"{label}.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
