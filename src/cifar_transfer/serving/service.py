"""The model as a web service (FastAPI): JSON prediction endpoints, health, OpenAPI docs and an
upload page.

Concurrent requests are batched: each request's images wait in a queue for at most a few
milliseconds, then everything queued is classified in one forward pass on the model's own thread, so
the event loop never blocks and the device sees large batches under load. Images are decoded on a
separate pool where at most two large ones decode at a time, so a burst of huge uploads neither
multiplies memory nor delays small requests. Request bodies are counted as they arrive and cut off
at the limit. Bad input is answered with a 4xx and a JSON `detail`; it never reaches the model and
never takes the service down.
"""

import asyncio
import collections
import contextlib
import errno
import html
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..data.folder import MAX_CLASSES
from ..data.images import ImageError, decode, open_image
from ..errors import CifarTransferError
from .deadline import with_read_timeout
from .predictor import Options, Predictor

MAX_BYTES = 10_000_000
MAX_IMAGES = 32
LARGE_PIXELS = 1_000_000  # a decode above this many pixels waits for one of the LARGE_DECODES slots
LARGE_DECODES = 2
FORM_OVERHEAD = 65_536  # multipart headers and boundaries around the image bytes
TopK = Annotated[
    int,
    Query(ge=1, le=MAX_CLASSES, description="how many classes to list, best first (at most all)"),
]
Calibrated = Annotated[
    bool,
    Query(
        description="divide the logits by the model's temperature (fitted on the validation "
        "split) before the softmax; false: raw probabilities"
    ),
]
TTA = Annotated[
    bool, Query(description="average the probabilities of the image and its mirror image")
]


class Batcher:
    """Micro-batching: gathers the images of concurrent requests and runs them through the model
    together.

    `logits` is the model's logits for the batch; it is a parameter so the batching can be tested on
    its own.
    """

    def __init__(
        self,
        logits: Callable[[np.ndarray], np.ndarray],
        max_batch: int = 128,
        wait_s: float = 0.004,
    ):
        self.logits, self.max_batch, self.wait_s = logits, max_batch, wait_s
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")  # the model's own thread
        # images per forward pass -> how often
        self.sizes: collections.Counter[int] = collections.Counter()

    async def classify(self, images: np.ndarray) -> np.ndarray:
        """The logits of `images`, computed in the next batch."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((images, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while (
                sum(len(i[0]) for i in items) < self.max_batch
                and (left := deadline - loop.time()) > 0
            ):
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            batch = np.concatenate([i[0] for i in items])
            self.sizes[len(batch)] += 1
            try:
                logits = await loop.run_in_executor(self.executor, self.logits, batch)
            except Exception as e:  # a model failure fails these requests, not the service
                for _, future in items:
                    if not future.done():  # a client that went away has cancelled its future
                        future.set_exception(e)
                continue
            start = 0
            for images, future in items:
                if not future.done():
                    future.set_result(logits[start : start + len(images)])
                start += len(images)


class Decoder:
    """Image decoding off the event loop, on its own threads: small images at once, large ones two
    at a time."""

    def __init__(self, size: int, threads: int = 2 + LARGE_DECODES):
        # the model's stored image size: every upload is prepared as its training images were
        self.size = size
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.large = asyncio.Semaphore(LARGE_DECODES)

    async def __call__(self, data: bytes, name: str) -> np.ndarray:
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(self.executor, open_image, data, name, self.size)
        if image.width * image.height <= LARGE_PIXELS:
            return await loop.run_in_executor(self.executor, decode, image, name, self.size)
        async with self.large:
            return await loop.run_in_executor(self.executor, decode, image, name, self.size)


class BodyLimit:
    """Counts a request's body as it arrives and answers 413 once it passes the path's limit: a body
    without Content-Length (chunked) is never read past the limit."""

    def __init__(self, app: ASGIApp, limits: dict[str, int], default: int = FORM_OVERHEAD):
        self.app, self.limits, self.default = app, limits, default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope["path"], self.default)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await _too_large(
                send, f"request body of {int(length):,} bytes is over the limit of {limit:,}"
            )
        seen, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                over = True
                raise HTTPException(413)  # stops the form parser; the response is replaced below
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            # whatever the app answers to the interrupted body is replaced by the 413 below
            if over:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(HTTPException):
            await self.app(scope, counted, guarded)
        if over and not started:
            await _too_large(send, f"request body is over the limit of {limit:,} bytes")


async def _too_large(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Problem(BaseModel):
    """Every refusal: what was wrong, in one sentence naming the file or field."""

    detail: str


class Top(BaseModel):
    class_: str = Field(alias="class")
    probability: float


class Described(BaseModel):
    """How the probabilities were made."""

    model: str
    calibrated: bool
    temperature: float | None
    tta: bool


class PredictionResponse(Described):
    top: list[Top]
    probabilities: dict[str, float]


class ImageResult(BaseModel):
    """One image of a batch: its classes, or why it could not be classified."""

    filename: str | None
    top: list[Top] | None = None
    probabilities: dict[str, float] | None = None
    error: str | None = None


class BatchResponse(Described):
    results: list[ImageResult]


REFUSALS = {
    400: {
        "model": Problem,
        "description": "not an image this service can read (empty, truncated, not an image, a "
        "decompression bomb), or two images sent to /predict",
    },
    413: {
        "model": Problem,
        "description": "a body, image or image count over the service's limits",
    },
    422: {
        "model": Problem,
        "description": "the request's form or query does not match this schema",
    },
}


def check_limits(max_bytes: int, max_images: int) -> None:
    """Limits that would refuse every request are refused at start."""
    if max_bytes < 1:
        raise ServiceError(f"--max-bytes {max_bytes}: must be at least 1")
    if max_images < 1:
        raise ServiceError(f"--max-images {max_images}: must be at least 1")


def create_app(
    run_dir: Path, max_bytes: int = MAX_BYTES, max_images: int = MAX_IMAGES, device: str = "auto"
) -> FastAPI:
    check_limits(max_bytes, max_images)
    predictor = Predictor(run_dir, device)
    batcher = Batcher(predictor.logits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(
        title="cifar-transfer",
        lifespan=lifespan,
        version="1",
        # Swagger UI renders this as Markdown: class names are folder names, the user's text
        description=(
            f"Image classifier `{predictor.model_id}`. Classes: "
            f"{html.escape(', '.join(predictor.classes))}."
        ),
    )
    batch_limit = max_bytes * max_images + FORM_OVERHEAD * max_images
    app.add_middleware(
        BodyLimit, limits={"/predict": max_bytes + FORM_OVERHEAD, "/predict/batch": batch_limit}
    )
    app.add_exception_handler(RequestValidationError, _validation_error)
    _prediction_routes(
        app, predictor, batcher, Decoder(predictor.model.image_size), max_bytes, max_images
    )
    _page_routes(app, predictor, batcher)
    _files_are_never_empty(app.openapi())  # cached by FastAPI: what /openapi.json serves
    return app


def _files_are_never_empty(schema: dict) -> None:
    """Document what /predict checks: its one file holds at least one byte (an empty one is a 400).

    In a batch an empty file is one image's error among the others' results, so there it stays
    valid.
    """
    for body in schema["components"]["schemas"].values():
        for field in body.get("properties", {}).values():
            if "contentMediaType" in field:
                field["minLength"] = 1


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in exc.errors()
    )
    hint = "upload the image as multipart/form-data field 'file' (or 'files' for /predict/batch)"
    return JSONResponse({"detail": f"{problems} ({hint})"}, status_code=422)


def _prediction_routes(
    app: FastAPI,
    predictor: Predictor,
    batcher: Batcher,
    decoder: Decoder,
    max_bytes: int,
    max_images: int,
) -> None:
    async def decode(upload: UploadFile) -> np.ndarray:
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(
                413, f"{upload.filename}: larger than the limit of {max_bytes:,} bytes"
            )
        try:
            return await decoder(data, upload.filename or "image")
        except ImageError as e:
            raise HTTPException(400, str(e)) from None

    async def classify(images: np.ndarray, options: Options) -> np.ndarray:
        return predictor.combine(
            await batcher.classify(predictor.model_inputs(images, options)), options
        )

    @app.post("/predict", summary="Classify one image (multipart field 'file')", responses=REFUSALS)
    async def predict(
        request: Request,
        file: Annotated[UploadFile, File()],
        top: TopK = 3,
        calibrated: Calibrated = True,
        tta: TTA = False,
    ) -> PredictionResponse:
        if (parts := len((await request.form()).getlist("file"))) > 1:
            raise HTTPException(
                400, f"{parts} 'file' parts: /predict classifies one image; use /predict/batch"
            )
        options = Options(calibrated, tta)
        probs = await classify((await decode(file))[None], options)
        return PredictionResponse(
            **predictor.describe(options), **_classes(probs[0], predictor.classes, top)
        )

    @app.post(
        "/predict/batch",
        summary="Classify several images (multipart fields 'files')",
        responses=REFUSALS,
    )
    async def predict_batch(
        files: Annotated[list[UploadFile], File(min_length=1)],
        top: TopK = 3,
        calibrated: Calibrated = True,
        tta: TTA = False,
    ) -> BatchResponse:
        if len(files) > max_images:
            raise HTTPException(413, f"{len(files)} images in one request; at most {max_images}")
        options = Options(calibrated, tta)
        images, results = {}, [ImageResult(filename=f.filename) for f in files]
        for i, f in enumerate(files):  # one bad image gets its error; the others their classes
            try:
                images[i] = await decode(f)
            except HTTPException as e:
                results[i].error = e.detail
        if images:
            for i, probs in zip(images, await classify(np.stack(list(images.values())), options)):
                results[i] = ImageResult(
                    filename=files[i].filename, **_classes(probs, predictor.classes, top)
                )
        return BatchResponse(**predictor.describe(options), results=results)


def _classes(probs: np.ndarray, classes: tuple[str, ...], top: int) -> dict:
    order = np.argsort(-probs)[:top]
    return {
        "top": [Top(**{"class": classes[i], "probability": float(probs[i])}) for i in order],
        "probabilities": {c: float(p) for c, p in zip(classes, probs)},
    }


def _page_routes(app: FastAPI, predictor: Predictor, batcher: Batcher) -> None:
    @app.get(
        "/health", summary="Liveness, the model's id and temperature, and how requests were batched"
    )
    async def health() -> dict:
        sizes = batcher.sizes
        return {
            "status": "ok",
            "model": predictor.model_id,
            "device": str(predictor.device),
            "temperature": predictor.temperature,
            "batches": {
                "count": sum(sizes.values()),
                "images": sum(k * n for k, n in sizes.items()),
                "largest": max(sizes, default=0),
            },
        }

    page = (
        resources.files("cifar_transfer.serving")
        .joinpath("static/index.html")
        .read_text(encoding="utf-8")
    )
    # a run folder's name is the user's text
    page = page.replace("{{MODEL}}", html.escape(predictor.model_id))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page


class ServiceError(CifarTransferError, ValueError):
    """The service's options would refuse every request."""


class PortError(CifarTransferError, OSError):
    """The service cannot listen where it was asked to (a port in use, an unknown host)."""


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, made here so a busy port is one clear error before anything is
    printed."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        return socket.create_server(address, family=family)
    except OSError as e:
        hint = (
            " (another process is using it: choose one with --port)"
            if e.errno == errno.EADDRINUSE
            else ""
        )
        # gaierror: < 0
        reason = os.strerror(e.errno) if isinstance(e.errno, int) and e.errno > 0 else str(e)
        raise PortError(f"cannot listen on {host}:{port}: {reason}{hint}") from None


def serve(
    run_dir: Path,
    host: str,
    port: int,
    max_bytes: int,
    max_images: int,
    device: str,
    read_timeout: float,
    max_connections: int,
) -> None:
    """Serve until stopped.

    A request must arrive whole within `read_timeout` seconds; at most `max_connections` connections
    are served at once (503 beyond).
    """
    import uvicorn

    app = create_app(run_dir, max_bytes, max_images, device)
    sock = listen(host, port)
    print(f"serving {run_dir} on http://{host}:{port}  (docs: /docs)", flush=True)
    protocol = with_read_timeout(read_timeout)
    config = uvicorn.Config(
        app, log_level="warning", http=protocol, limit_concurrency=max_connections
    )
    uvicorn.Server(config).run(sockets=[sock])
