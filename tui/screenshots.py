"""SVG screenshots of every screen (and a model's detail view) for the docs:
``python -m lastmile.tui.screenshots --socket S --out docs/tui [--size 80x24]`` against a
running daemon (send it some traffic first for live figures)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from lastmile.appliance.client.api import LastmileClient
from lastmile.tui.app import LastmileApp
from lastmile.tui.state import is_generation


async def capture(socket: str, out: Path, size: tuple[int, int], settle_s: float = 2.5) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    app = LastmileApp(LastmileClient(socket), rate_hz=5)
    written = []
    async with app.run_test(size=size) as pilot:
        await pilot.pause(settle_s)
        for key, name in (("d", "dashboard"), ("m", "models"), ("t", "tune"), ("p", "playground"), ("e", "events"), ("c", "chat")):
            await pilot.press(key)
            await pilot.pause(1.0)
            if name == "playground":
                await pilot.press("ctrl+r")
                await pilot.pause(1.0)
            if name == "chat":  # the box has the keys on arrival: leave it, so the next one-letter key switches
                await pilot.press("escape")
            written.append(Path(app.save_screenshot(f"{name}.svg", path=str(out))))
            if name == "dashboard":  # Enter on the highlighted row: that model's detail view
                await pilot.press("enter")
                await pilot.pause(1.5)
                written.append(Path(app.save_screenshot("detail.svg", path=str(out))))
                await pilot.press("escape")
                await pilot.pause(0.5)
                generation = [r["name"] for r in app.state.models if is_generation(r)]
                if generation:  # a generation model's detail view: what runs, tokens/s, TTFT, sequences, KV
                    app.open_detail(generation[0])
                    await pilot.pause(1.5)
                    written.append(Path(app.save_screenshot("detail-generation.svg", path=str(out))))
                    await pilot.press("escape")
                    await pilot.pause(0.5)
        await pilot.press("question_mark")
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot("help.svg", path=str(out))))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--out", default="docs/tui")
    parser.add_argument("--size", default="160x48", help="COLSxROWS")
    args = parser.parse_args()
    cols, rows = (int(v) for v in args.size.split("x"))
    for path in asyncio.run(capture(args.socket, Path(args.out), (cols, rows))):
        print(path)


if __name__ == "__main__":
    main()
