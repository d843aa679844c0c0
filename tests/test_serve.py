"""The service started for real on 127.0.0.1 and called over HTTP; the upload page in headless
Chromium."""

import asyncio
import contextlib
import io
import select
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cifar_transfer.data.cifar import CLASSES
from cifar_transfer.data.images import MAX_PIXELS
from cifar_transfer.serving.predictor import Options, Predictor
from cifar_transfer.serving.service import Batcher


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(run_dir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`serve RUN_DIR` in its own process, once it answers: (base URL, process)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cifar_transfer.cli",
            "serve",
            str(run_dir),
            "--port",
            str(port),
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        pytest.fail("server did not start")
    try:
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def service(smoke_run):
    """The smoke run's service in its own process: (base URL, process)."""
    with serving(smoke_run) as started:
        yield started


@pytest.fixture(scope="module")
def server(service):
    return service[0]


@pytest.fixture(scope="module")
def predictor(smoke_run):
    return Predictor(smoke_run, "cpu")


def test_health_and_docs(server, predictor):
    health = httpx.get(f"{server}/health").json()
    assert {k: health[k] for k in ("status", "model", "device", "temperature")} == {
        "status": "ok",
        "model": predictor.model_id,
        "device": "cpu",
        "temperature": predictor.temperature,
    }
    spec = httpx.get(f"{server}/openapi.json").json()
    assert {"/predict", "/predict/batch", "/health"} <= set(spec["paths"])
    assert httpx.get(f"{server}/docs").status_code == 200


@pytest.mark.parametrize("options", [Options(), Options(calibrated=False), Options(tta=True)])
def test_predict_one_image_matches_the_model(server, predictor, cifar, options):
    image = cifar[1].images[7]
    params = {
        "top": 5,
        "calibrated": str(options.calibrated).lower(),
        "tta": str(options.tta).lower(),
    }
    r = httpx.post(
        f"{server}/predict", files={"file": ("x.png", png(image), "image/png")}, params=params
    )
    assert r.status_code == 200
    body = r.json()
    want = predictor.probabilities(image[None], options)[0]
    assert body["model"] == predictor.model_id
    assert (body["calibrated"], body["tta"]) == (options.calibrated, options.tta)
    assert body["temperature"] == (predictor.temperature if options.calibrated else None)
    assert [t["class"] for t in body["top"]] == [CLASSES[i] for i in np.argsort(-want)[:5]]
    assert np.allclose([body["probabilities"][c] for c in CLASSES], want, atol=1e-5)


def test_predict_batch_keeps_the_order(server, predictor, cifar):
    images = cifar[1].images[10:14]
    files = [("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
    body = httpx.post(f"{server}/predict/batch", files=files).json()
    want = predictor.probabilities(images)
    assert [r["filename"] for r in body["results"]] == ["0.png", "1.png", "2.png", "3.png"]
    assert [r["top"][0]["class"] for r in body["results"]] == [CLASSES[i] for i in want.argmax(1)]


def bomb() -> bytes:
    side = int(MAX_PIXELS**0.5) + 100
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("path", "files", "status", "fragment"),
    [
        ("/predict", {"file": ("a.txt", b"just text", "text/plain")}, 400, "not an image"),
        (
            "/predict",
            {"file": ("t.png", png(np.full((64, 64, 3), 9, np.uint8))[:60], "image/png")},
            400,
            "truncated",
        ),
        ("/predict", {"file": ("z.png", b"", "image/png")}, 400, "empty (0 bytes)"),
        (
            "/predict",
            {"file": ("big.bin", b"\0" * (10_000_000 + 1), "image/png")},
            413,
            "larger than the limit",
        ),
        ("/predict", {"file": ("bomb.png", bomb(), "image/png")}, 400, "over the limit"),
        (
            "/predict",
            {"image": ("x.png", png(np.zeros((32, 32, 3), np.uint8)), "image/png")},
            422,
            "file",
        ),
        (
            "/predict/batch",
            [
                ("files", (f"{i}.png", png(np.zeros((32, 32, 3), np.uint8)), "image/png"))
                for i in range(33)
            ],
            413,
            "at most 32",
        ),
    ],
)
def test_bad_input_gets_a_json_4xx_and_the_service_stays_up(server, path, files, status, fragment):
    r = httpx.post(f"{server}{path}", files=files, timeout=60)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]
    assert httpx.get(f"{server}/health").status_code == 200


@pytest.mark.slow
def test_bounded_load_has_no_failures_and_is_batched(server, cifar):
    """500 requests, 8 at a time, with every tenth client disconnecting mid-request; prints p50/p99
    latency.

    The ones that stay are all answered, and concurrent requests share forward passes.
    """
    bodies = [png(im) for im in cifar[1].images[:50]]
    before = httpx.get(f"{server}/health").json()["batches"]

    def call(i: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        # a client that gives up after 5 ms: the request is queued or being classified when it
        # leaves
        try:
            r = httpx.post(
                f"{server}/predict",
                files={"file": ("x.png", bodies[i % 50], "image/png")},
                timeout=0.005 if i % 10 == 9 else 60,
            )
        except httpx.TimeoutException:
            return -1, time.perf_counter() - t0
        return r.status_code, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(500)))
    wall = time.perf_counter() - t0
    stayed = [(i, s, t) for i, (s, t) in enumerate(results) if i % 10 != 9]
    latencies = sorted(t for _, _, t in stayed)
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * len(latencies)) - 1]
    after = httpx.get(f"{server}/health").json()["batches"]
    passes, images = after["count"] - before["count"], after["images"] - before["images"]
    print(
        f"\nload: 500 requests (50 disconnecting), 8 concurrent, {wall:.1f} s, {500 / wall:.0f} "
        f"req/s, p50 {1000 * p50:.0f} ms, p99 {1000 * p99:.0f} ms; {images} images in {passes} "
        f"forward passes, largest {after['largest']}"
    )
    assert [s for _, s, _ in stayed] == [200] * 450
    assert passes < images and after["largest"] > 1  # batched under concurrency
    assert httpx.get(f"{server}/health", timeout=5).status_code == 200


def test_a_cancelled_request_does_not_break_the_batcher():
    """A client that goes away cancels its future while its batch is in the model; the next batch
    still runs."""

    def slow_logits(images: np.ndarray) -> np.ndarray:
        time.sleep(0.3)
        return np.zeros((len(images), 10), np.float32)

    async def scenario() -> np.ndarray:
        batcher = Batcher(slow_logits)
        worker = asyncio.create_task(batcher.run())
        leaving = asyncio.create_task(batcher.classify(np.zeros((1, 32, 32, 3), np.uint8)))
        await asyncio.sleep(0.1)  # its batch is in the model now
        leaving.cancel()
        result = await asyncio.wait_for(
            batcher.classify(np.zeros((2, 32, 32, 3), np.uint8)), timeout=10
        )
        assert not worker.done(), worker.exception()
        worker.cancel()
        return result

    assert asyncio.run(scenario()).shape == (2, 10)


def test_a_slow_batch_does_not_starve_health(smoke_run, monkeypatch, cifar):
    """The model's forward pass made slow (3 s): /health answers at once while a prediction waits
    for it."""
    import uvicorn

    from cifar_transfer.serving import service as serve

    original = Predictor.logits
    monkeypatch.setattr(
        Predictor, "logits", lambda self, images: (time.sleep(3), original(self, images))[1]
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(serve.create_app(smoke_run, device="cpu"), port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        while not server.started:
            time.sleep(0.05)
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(
                httpx.post,
                f"{url}/predict",
                files={"file": ("x.png", png(cifar[1].images[0]))},
                timeout=60,
            )
            time.sleep(0.5)  # the prediction is in the model now
            t0 = time.perf_counter()
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            waited = time.perf_counter() - t0
            assert not slow.done()
            assert slow.result().status_code == 200
        assert waited < 1.0, f"/health took {waited:.2f} s during a slow batch"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian chromium is not installed (make test installs it)"
)
@pytest.mark.browser
def test_upload_page_in_headless_chromium(server, predictor, cifar, tmp_path):
    from playwright.sync_api import sync_playwright

    image = cifar[1].images[21]
    path = tmp_path / "test-image.png"
    path.write_bytes(png(image))
    expected = CLASSES[int(predictor.probabilities(image[None])[0].argmax())]
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 900, "height": 760})
        page.goto(server)
        assert "What is in this picture?" in page.content()
        page.set_input_files("#file", str(path))
        page.wait_for_selector("#out:not([hidden])", timeout=30_000)
        assert page.inner_text("#top-class") == expected
        assert page.locator("#bars .row").count() == 10
        assert page.get_attribute("#bars .row.best", "data-class") == expected
        temperature = (
            f"{predictor.temperature:.3g}"  # the page says the bars are calibrated, and how
        )
        assert page.inner_text("#calibration") == (
            f"calibrated probabilities (temperature {temperature}, fitted on the validation split)"
        )
        page.screenshot(path=str(tmp_path / "page.png"))
        shots = Path(__file__).parent.parent / "runs" / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "upload-page.png"))
        browser.close()


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return (
        int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
        / 1024
    )


def test_huge_uploads_neither_multiply_memory_nor_delay_small_requests(service, cifar):
    """Eight concurrent uploads of a 16-megapixel RGBA PNG (a few hundred kB each) while small
    requests and health checks go on: each small one is answered about as fast as without the
    load."""
    url, proc = service
    buf = io.BytesIO()
    ramp = np.broadcast_to(
        np.linspace(0, 255, 4000, dtype=np.uint8)[:, None, None], (4000, 4000, 4)
    )
    Image.fromarray(np.ascontiguousarray(ramp), "RGBA").save(buf, format="PNG")
    huge, small = buf.getvalue(), png(cifar[1].images[3])
    assert len(huge) < 1_000_000

    def post(body: bytes) -> float:
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/predict", files={"file": ("x.png", body, "image/png")}, timeout=120)
        assert r.status_code == 200, r.text
        return time.perf_counter() - t0

    def timed_get() -> float:
        t0 = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=60).status_code == 200
        return time.perf_counter() - t0

    quiet = sorted(post(small) for _ in range(5))[2]
    rss_before = peak_rss_mib(proc.pid)
    with ThreadPoolExecutor(8) as pool:
        heavy = [pool.submit(post, huge) for _ in range(8)]
        time.sleep(0.3)  # the huge uploads are being decoded now
        busy, health = [], []
        while not all(f.done() for f in heavy):
            busy.append(post(small))
            health.append(timed_get())
        heavy_s = [f.result() for f in heavy]
    grown = peak_rss_mib(proc.pid) - rss_before
    print(
        f"\nunder 8 huge uploads ({max(heavy_s):.1f} s): small request {1000 * quiet:.0f} ms "
        f"quiet, worst {1000 * max(busy):.0f} ms busy; /health worst {1000 * max(health):.0f} ms; "
        f"peak RSS +{grown:.0f} MiB"
    )
    assert len(busy) >= 3, "the huge uploads finished before small requests could be timed"
    assert max(health) < 0.5
    assert max(busy) < max(1.0, 10 * quiet)
    assert grown < 1024


def raw_request(url: str, head: str, chunks: list[bytes] = ()) -> tuple[bytes, int]:
    """Send `head`, then `chunks` in chunked encoding until the server answers; return the answer's
    first bytes and how many body bytes were sent before it came."""
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(head.encode())
        for chunk in chunks:
            if select.select([s], [], [], 0)[0]:  # answered already
                break
            try:
                s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        return s.recv(200), sent


def test_a_body_is_cut_off_at_the_limit_with_or_without_content_length(server):
    multipart = "multipart/form-data; boundary=xyz"
    # one image's limit is 10 MB
    answer, _ = raw_request(
        server,
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {multipart}\r\nContent-Length: "
        f"{20_000_000}\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer
    head = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {multipart}\r\nTransfer-Encoding: "
        "chunked\r\n\r\n"
    )
    part = (
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\nContent-Type: '
        b"image/png\r\n\r\n"
    )
    answer, sent = raw_request(server, head, [part, *[b"\0" * 1_000_000] * 400])
    assert answer.startswith(b"HTTP/1.1 413"), answer
    # stopped near the 10 MB limit (plus what socket buffers hold), not after 400 MB
    assert sent < 40_000_000
    assert httpx.get(f"{server}/health").status_code == 200


def test_a_busy_port_is_one_line_before_anything_is_printed(smoke_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "cifar_transfer.cli",
                "serve",
                str(smoke_run),
                "--port",
                str(port),
                "--device",
                "cpu",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1 and done.stdout == "", done.stdout
    assert done.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use (another process is "
        "using it: choose one with --port)"
    ]


# Schemathesis' data-acceptance checks judge a multipart file part by its JSON type, but an upload
# is bytes: the "integer" -44988 is a valid (non-image) upload, and no schema can say "bytes that
# decode as an image". What it checks here is the contract: no 5xx, every status documented, every
# body and header as documented.
CONTRACT = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    ]
)


def test_the_service_answers_as_its_openapi_document_says(server, tmp_path):
    check_contract(server, tmp_path)


@pytest.mark.slow
def test_a_folder_models_service_answers_as_its_document_says(digits_run, tmp_path):
    with serving(digits_run) as (url, _):
        assert "Classes: 0, 1, 2" in httpx.get(f"{url}/openapi.json").json()["info"]["description"]
        check_contract(url, tmp_path, examples=20)


def check_contract(url: str, folder: Path, examples: int = 40) -> None:
    """Schemathesis over every operation of the service's own OpenAPI document."""
    st = Path(sys.executable).with_name("st")
    done = subprocess.run(
        [
            *(
                str(st),
                "run",
                f"{url}/openapi.json",
                "--checks",
                f"{CONTRACT},response_headers_conformance",
            ),
            *(
                "--max-examples",
                str(examples),
                "--seed",
                "0",
                "--no-color",
                "--request-timeout",
                "60",
            ),
        ],
        cwd=folder,  # its example database stays out of the checkout
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    assert "3/3" in done.stdout and "passed" in done.stdout  # every operation was exercised


def test_one_bad_image_in_a_batch_gets_its_own_error(server, predictor, cifar):
    files = [
        ("files", ("good.png", png(cifar[1].images[0]), "image/png")),
        ("files", ("bad.png", b"not an image", "image/png")),
        ("files", ("empty.png", b"", "image/png")),
    ]
    body = httpx.post(f"{server}/predict/batch", files=files).json()
    good, bad, empty = body["results"]
    assert good["top"][0]["class"] == CLASSES[predictor.probabilities(cifar[1].images[:1]).argmax()]
    assert bad == {"filename": "bad.png", "top": None, "probabilities": None, "error": bad["error"]}
    assert (
        "bad.png: not an image" in bad["error"] and "empty.png: empty (0 bytes)" in empty["error"]
    )


def test_two_files_sent_to_predict_are_refused(server, cifar):
    image = png(cifar[1].images[0])
    files = [("file", ("a.png", image, "image/png")), ("file", ("b.png", image, "image/png"))]
    r = httpx.post(f"{server}/predict", files=files)
    assert r.status_code == 400 and "2 'file' parts" in r.json()["detail"]


def test_the_upload_page_escapes_the_run_folder_name(smoke_run, tmp_path):
    from cifar_transfer.serving.service import create_app

    folder = tmp_path / "x<img src=x onerror=alert(1)>"
    folder.mkdir()
    (folder / "model.safetensors").hardlink_to(smoke_run / "model.safetensors")

    async def get_page() -> str:
        transport = httpx.ASGITransport(app=create_app(folder, device="cpu"))
        async with httpx.AsyncClient(transport=transport, base_url="http://page") as client:
            return (await client.get("/")).text

    page = asyncio.run(get_page())
    assert "<img src=x" not in page and "x&lt;img src=x onerror=alert(1)&gt;" in page
