"""Headless Chromium driven over the DevTools protocol (real key presses, real navigation),
and the small demo-like store the browser tests and the README screenshots use."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import requests

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             "/usr/bin/chromium") if p and Path(p).exists()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium page: ``open``, ``evaluate``, ``wait_for``, ``press``, ``screenshot``."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 1000):
        from websockets.sync.client import connect

        port = free_port()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--remote-debugging-port={port}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        page = None
        while page is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                page = next((t for t in targets if t.get("type") == "page"), None)
            except (requests.RequestException, ValueError):
                pass
            if page is None:
                if time.time() > deadline:
                    raise RuntimeError("chromium's DevTools endpoint did not come up")
                time.sleep(0.2)
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20, open_timeout=30)
        self._ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        i = next(self._ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(deadline - time.time(), 0.1)))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href.startsWith(%s)" % json.dumps(url.split("?")[0]))

    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            return None
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 120):
        deadline = time.time() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:        # the page is navigating
                value = None
            if value:
                return value
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {expression}; page: "
                                     f"{self.evaluate('document.body && document.body.innerText.slice(0, 500)')}")
            time.sleep(0.2)

    def press(self, key: str) -> None:
        """A real key press (keydown with its text, keyup) to the focused page."""
        code = f"Key{key.upper()}" if key.isalpha() else (f"Digit{key}" if key.isdigit() else "Space")
        vk = ord(key.upper()) if key.strip() else 32
        for kind in ("keyDown", "keyUp"):
            params = {"type": kind, "key": key, "code": code, "windowsVirtualKeyCode": vk}
            if kind == "keyDown":
                params["text"] = key
            self.call("Input.dispatchKeyEvent", **params)

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params = {"format": "png"}
        if full_page:
            size = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": size[0], "height": min(size[1], 2400), "scale": 1}
            params["captureBeyondViewport"] = True
        data = self.call("Page.captureScreenshot", **params)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def demo_store(engine, sample_dir: Path, threshold: float | None = None, **sample_kwargs) -> list[str]:
    """Write a sample, ingest it and materialise crops -> embeddings -> deer_profiles ->
    similarity_scores for every partition through Dagster (as the demo does). Returns the
    partition keys."""
    import dagster as dg

    from deer_pipeline import sample
    from deer_pipeline.definitions import defs
    from deer_pipeline.defs.partitions import CAMERA_PARTITIONS_NAME, partition_key
    from deer_pipeline.detections import feed, ingest

    info = sample.write_sample(sample_dir, **sample_kwargs)
    ingest.ingest(engine, info.detections_json)
    parts = feed.partitions_with_detections(engine)
    job = defs.resolve_job_def("identification_job")
    run_config = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    if threshold is not None:
        run_config["resources"] = {"identity": {"config": {"reid_threshold": threshold}}}
    keys = []
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, sorted({c for c, _ in parts}))
        for camera, day in parts:
            key = partition_key(camera, day)
            result = job.execute_in_process(instance=instance, partition_key=key, run_config=run_config,
                                            raise_on_error=False)
            if not result.success:
                failures = [f"{e.step_key}: {e.event_specific_data.error.message.strip()[:300]}"
                            for e in result.all_events if e.is_step_failure]
                checks = [f"{c.check_name}: {c.description}" for c in result.get_asset_check_evaluations()
                          if not c.passed]
                raise AssertionError(f"identification_job failed for {key}: {failures} {checks}")
            keys.append(f"{camera}|{day}")
    return keys
