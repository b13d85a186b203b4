"""Transfer throughput and memory: ``store_image`` against a plain ``httpx.stream`` copy.

Sources: a 4K PNG made by the emulator with photo-like grain (~28 MB) and a 200 MB PNG
served as a static file. Destinations: a local folder and moto S3 (over loopback). Each
transfer runs in a fresh subprocess that reports its wall time and the growth of its peak
RSS during the transfer (the kernel's high-water mark, reset when the transfer starts,
minus the RSS before it), so memory is measured per transfer, not per process lifetime.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks.common import RUNS, Figure, call_in_subprocess, median

MIB = 1024 * 1024
# A 4K image crosses loopback in under half a second, and on 2 cores shared with moto and
# the emulator single transfers varied by +/-40 % (0.35-0.65 s for the same copy): more
# runs than the other figures, so that the median holds.
TRANSFER_RUNS = max(RUNS, 11)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(mode: str, url: str, destination: str, options: dict[str, Any]) -> dict[str, float]:
    """Run in the subprocess: one transfer, timed, with its memory growth: the peak RSS
    during the transfer (the kernel's high-water mark, reset just before it starts) minus
    the RSS before it."""
    import time

    import httpx

    from prefect_journey.storage import DOWNLOAD_CHUNK, UPLOAD_PART_SIZE, Destination, store_image

    fs, root = Destination(destination, options).filesystem()  # warm imports and clients
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = _status_kib("VmRSS")
    started = time.perf_counter()
    if mode == "ours":
        stored = store_image(
            url,
            Destination(destination, options),
            task_id=os.urandom(6).hex(),
            max_bytes=1024 * MIB,
        )
        size = stored.bytes
    else:
        size = 0
        with (
            httpx.stream("GET", url, timeout=60) as response,
            fs.open(f"{root}/{os.urandom(6).hex()}.png", "wb", block_size=UPLOAD_PART_SIZE) as out,
        ):
            for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                out.write(chunk)
                size += len(chunk)
    seconds = time.perf_counter() - started
    growth = (_status_kib("VmHWM") - before) * 1024
    return {"seconds": seconds, "bytes": size, "growth": max(0, growth)}


def _big_png(path: Path, megabytes: int) -> None:
    from PIL import Image

    side = int((megabytes * MIB / 3) ** 0.5)
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(path, compress_level=0)


def measure() -> dict[str, Any]:
    import boto3
    from moto.server import ThreadedMotoServer
    from starlette.applications import Starlette
    from starlette.staticfiles import StaticFiles

    from benchmarks.common import emulator_process
    from prefect_journey.client import JourneyClient
    from prefect_journey.emulator import BackgroundServer

    results: dict[str, Any] = {}
    # Werkzeug logs every request at INFO on its own: thousands of S3 part uploads.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="b",
        aws_secret_access_key="b",
    ).create_bucket(Bucket="bench")
    s3 = ("s3://bench", {"endpoint_url": endpoint, "key": "b", "secret": "b"})
    with tempfile.TemporaryDirectory() as files, tempfile.TemporaryDirectory() as out:
        _big_png(Path(files) / "big.png", 200)
        static = Starlette()
        static.mount("/", StaticFiles(directory=files))
        with (
            BackgroundServer(static) as server,
            emulator_process("--realistic-sizes", "--time-scale", "0.01") as emu,
        ):
            with JourneyClient("bench-key", base_url=emu) as client:
                four_k = client.imagine(
                    prompt="a 4K benchmark image", resolution="4K", aspect_ratio="16:9"
                )
            sources = {"4K PNG": four_k.image_url, "200 MB PNG": f"{server.url}/big.png"}
            # Both servers are on loopback, which downloads may reach only when allowed.
            allowed = {
                "JOURNEY_PRIVATE_ENDPOINTS": f"{urlsplit(emu).netloc},{server.host}:{server.port}"
            }
            for source, url in sources.items():
                for dest_name, (dest, options) in {"local": (out, {}), "S3": s3}.items():
                    runs: dict[str, list[dict[str, float]]] = {"ours": [], "plain": []}
                    for _ in range(TRANSFER_RUNS):  # interleaved: drift hits both alike
                        for mode, done in runs.items():
                            done.append(
                                call_in_subprocess(
                                    "benchmarks.transfer:_child",
                                    mode,
                                    url,
                                    dest,
                                    options,
                                    env=allowed,
                                )
                            )
                    results[f"{source} -> {dest_name}"] = {
                        mode: {
                            "mb_per_s": median([r["bytes"] / r["seconds"] / MIB for r in rs]),
                            "growth_mib": median([r["growth"] / MIB for r in rs]),
                            "bytes": rs[0]["bytes"],
                        }
                        for mode, rs in runs.items()
                    }
    moto.stop()
    return results


def figures(results: dict[str, Any]) -> list[Figure]:
    rows = []
    for name, r in results.items():
        rows.append(
            Figure(
                f"{name}: throughput (median of {TRANSFER_RUNS})",
                r["ours"]["mb_per_s"],
                r["plain"]["mb_per_s"],
                "MiB/s",
                "httpx.stream copy",
                ">= 0.9",
            )
        )
    return rows


def memory_growth(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per destination: the peak memory growth of ``store_image`` for the smallest and the
    largest object, and whether it stays constant in size: the two within 3 chunks (the
    download chunk locally, the multipart part for S3), the target's allowance."""
    from prefect_journey.storage import DOWNLOAD_CHUNK, UPLOAD_PART_SIZE

    verdicts = []
    for destination, chunk in (("local", DOWNLOAD_CHUNK), ("S3", UPLOAD_PART_SIZE)):
        transfers = sorted(
            (r["ours"] for name, r in results.items() if name.endswith(f"-> {destination}")),
            key=lambda r: r["bytes"],
        )
        small, large = transfers[0], transfers[-1]
        verdicts.append(
            {
                "destination": destination,
                "sizes_mib": (small["bytes"] / MIB, large["bytes"] / MIB),
                "growth_mib": (small["growth_mib"], large["growth_mib"]),
                "chunk_mib": chunk / MIB,
                "met": large["growth_mib"] - small["growth_mib"] <= 3 * chunk / MIB,
            }
        )
    return verdicts


def memory_table(results: dict[str, Any]) -> str:
    lines = [
        "| transfer | size | store_image peak RSS growth | plain copy peak RSS growth |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['ours']['bytes'] / MIB:.0f} MiB | {r['ours']['growth_mib']:.1f} MiB "
            f"| {r['plain']['growth_mib']:.1f} MiB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
