"""The model as a web service (FastAPI): JSON prediction endpoints, health, OpenAPI docs and an upload page.

Concurrent requests are batched: each request's images wait in a queue for at most a few milliseconds, then
everything queued is classified in one forward pass in a worker thread, so the event loop never blocks and
the device sees large batches under load. Bad input is answered with a 4xx and a JSON `detail`; it never
reaches the model and never takes the service down.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from .data import CLASSES
from .predict import ImageError, Predictor, read_image

MAX_BYTES = 10_000_000
MAX_IMAGES = 32
TopK = Annotated[int, Query(ge=1, le=len(CLASSES), description="how many classes to list, best first")]


class Batcher:
    """Micro-batching: gathers the images of concurrent requests and classifies them together."""

    def __init__(self, predictor: Predictor, max_batch: int = 128, wait_s: float = 0.004):
        self.predictor, self.max_batch, self.wait_s = predictor, max_batch, wait_s
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()

    async def classify(self, images: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((images, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while sum(len(i[0]) for i in items) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            try:
                probs = await loop.run_in_executor(
                    None, self.predictor.probabilities, np.concatenate([i[0] for i in items]))
            except Exception as e:  # a model failure fails these requests, not the service
                for _, future in items:
                    future.set_exception(e)
                continue
            start = 0
            for images, future in items:
                future.set_result(probs[start:start + len(images)])
                start += len(images)


def create_app(run_dir: Path, max_bytes: int = MAX_BYTES, max_images: int = MAX_IMAGES,
               device: str = "auto") -> FastAPI:
    predictor = Predictor(run_dir, device)
    batcher = Batcher(predictor)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="cifar-transfer", lifespan=lifespan, version="1",
                  description=f"CIFAR-10 classifier `{predictor.model_id}`. Classes: {', '.join(CLASSES)}.")

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        """Refuse an oversized body from its Content-Length, before reading it."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_bytes * max_images + 65_536:
            return JSONResponse({"detail": f"request body of {int(length):,} bytes is too large"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}"
                             for e in exc.errors())
        hint = "upload the image as multipart/form-data field 'file' (or 'files' for /predict/batch)"
        return JSONResponse({"detail": f"{problems} ({hint})"}, status_code=422)

    async def decode(upload: UploadFile) -> np.ndarray:
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"{upload.filename}: larger than the limit of {max_bytes:,} bytes")
        try:
            return await asyncio.to_thread(read_image, data, upload.filename or "image")
        except ImageError as e:
            raise HTTPException(400, str(e)) from None

    def result(probs: np.ndarray, top: int) -> dict:
        order = np.argsort(-probs)[:top]
        return {"top": [{"class": CLASSES[i], "probability": float(probs[i])} for i in order],
                "probabilities": {c: float(p) for c, p in zip(CLASSES, probs)}}

    @app.post("/predict", summary="Classify one image (multipart field 'file')")
    async def predict(file: Annotated[UploadFile, File()], top: TopK = 3) -> dict:
        probs = await batcher.classify((await decode(file))[None])
        return {"model": predictor.model_id, **result(probs[0], top)}

    @app.post("/predict/batch", summary="Classify several images (multipart fields 'files')")
    async def predict_batch(files: Annotated[list[UploadFile], File()], top: TopK = 3) -> dict:
        if len(files) > max_images:
            raise HTTPException(413, f"{len(files)} images in one request; at most {max_images}")
        images = np.stack([await decode(f) for f in files])
        probs = await batcher.classify(images)
        return {"model": predictor.model_id,
                "results": [{"filename": f.filename, **result(p, top)} for f, p in zip(files, probs)]}

    @app.get("/health", summary="Liveness and the model's id")
    async def health() -> dict:
        return {"status": "ok", "model": predictor.model_id, "device": str(predictor.device)}

    page = resources.files("cifar_transfer").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page.replace("{{MODEL}}", predictor.model_id)

    return app


def serve(run_dir: Path, host: str, port: int, max_bytes: int, max_images: int, device: str) -> None:
    import uvicorn

    app = create_app(run_dir, max_bytes, max_images, device)
    print(f"serving {run_dir} on http://{host}:{port}  (docs: /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
