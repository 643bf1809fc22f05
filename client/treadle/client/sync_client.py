"""The blocking SDK: `Client`, the same calls as `AsyncClient` without asyncio.

It runs one `AsyncClient` on a private event loop in a background thread, so
both share one implementation.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from ..api.limits import RequestLimits
from .async_client import AsyncClient
from .connection import Connection, TlsConfig
from .convert import Prompt
from .results import Event, ModelInfo, Result
from .retry import RetryPolicy
from .session import AsyncSession, SessionRequest
from .streams import ResponseStream
from .tools import ToolChoiceLike, ToolLike

T = TypeVar("T")


class _LoopThread:
    """An event loop in a daemon thread, and the means to run coroutines on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="treadle-client", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:  # e.g. KeyboardInterrupt while waiting: stop the work too
            future.cancel()
            raise

    def iterate(self, make: Callable[[], Any]) -> Iterator[Any]:
        """Iterate an async iterator built on the loop by `make()`; closing it closes that."""

        async def build() -> Any:
            return make()

        source = self.run(build())
        try:
            while True:
                try:
                    yield self.run(_anext(source))
                except StopAsyncIteration:
                    return
        finally:
            close = getattr(source, "aclose", None)
            if close is not None:
                self.run(close())

    def stop(self) -> None:
        """Finish what is still pending on the loop (gRPC's own tasks too), then stop it.

        Stopping with tasks pending would leave them to be destroyed later
        ("Task was destroyed but it is pending!").
        """
        if self._thread.is_alive():
            try:
                self.run(_settle())
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(timeout=10)
        self.loop.close()


async def _settle() -> None:
    """Cancel every other task on the running loop and wait (bounded) for them to end."""
    for _ in range(3):  # a cancelled task may start another
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not pending:
            break
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=5)
    await asyncio.get_running_loop().shutdown_asyncgens()


async def _anext(source: AsyncIterator[T]) -> T:
    return await source.__anext__()


class Client:
    """A blocking treadle client over one reused channel; see AsyncClient for the calls.

        with Client("localhost:50051") as client:
            print(client.generate("Once upon a time", max_new_tokens=32).text)
            for text in client.stream_text([{"role": "user", "content": "Hi"}]):
                print(text, end="", flush=True)

    Breaking out of a stream (or Ctrl-C while it runs) cancels the request on
    the server.
    """

    def __init__(
        self,
        target: str | Sequence[str] = "localhost:50051",
        *,
        tls: TlsConfig | None = None,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        limits: RequestLimits | None = None,
    ) -> None:
        self._loop = _LoopThread()
        self._async = AsyncClient(
            target,
            tls=tls,
            token=token,
            metadata=metadata,
            timeout=timeout,
            retry=retry,
            limits=limits,
        )

        async def open_channel() -> None:  # grpc.aio channels belong to the loop they start on
            self._async.stub  # noqa: B018

        self._loop.run(open_channel())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels and stop the loop thread; closing again does nothing."""
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._async.close())
        finally:
            self._loop.stop()

    @property
    def connection(self) -> Connection:
        """Where and how this client connects (targets, TLS, retry policy)."""
        return self._async.connection

    def generate(self, prompt: Prompt | None = None, **kwargs: Any) -> Result:
        """Generate a whole answer (same arguments as AsyncClient.generate)."""
        return self._loop.run(self._async.generate(prompt, **kwargs))

    def stream(self, prompt: Prompt | None = None, **kwargs: Any) -> Iterator[Event]:
        """Stream the events of a request (same arguments as AsyncClient.stream)."""
        stream: ResponseStream = self._async.stream(prompt, **kwargs)  # checks before sending
        return self._loop.iterate(lambda: stream)

    def stream_text(self, prompt: Prompt | None = None, **kwargs: Any) -> Iterator[str]:
        """Only the text of a request, as it is released."""
        stream = self._async.stream(prompt, **kwargs)
        return self._loop.iterate(stream.text)

    def session(self, timeout: float | None = None) -> Session:
        return Session(self._loop, self._async.session(timeout))

    def model_info(self, timeout: float | None = None) -> ModelInfo:
        return self._loop.run(self._async.model_info(timeout))

    def tokenize(
        self,
        prompt: Prompt,
        timeout: float | None = None,
        tools: Sequence[ToolLike] = (),
        tool_choice: ToolChoiceLike | None = None,
    ) -> list[int]:
        return self._loop.run(self._async.tokenize(prompt, timeout, tools, tool_choice))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        return self._loop.run(self._async.health(service, timeout))


class Session:
    """`with client.session() as s:` then `s.submit(...)`; each request iterates on its own."""

    def __init__(self, loop: _LoopThread, session: AsyncSession) -> None:
        self._loop = loop
        self._session = session

    def __enter__(self) -> Session:
        self._loop.run(self._session.__aenter__())
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._loop.run(self._session.__aexit__(exc_type, exc, tb))

    def submit(self, prompt: Prompt | None = None, **kwargs: Any) -> SyncSessionRequest:
        async def submit() -> SessionRequest:
            return self._session.submit(prompt, **kwargs)

        return SyncSessionRequest(self._loop, self._loop.run(submit()))


class SyncSessionRequest:
    """One request of a sync Session: iterate its events, `cancel()`, `result()`."""

    def __init__(self, loop: _LoopThread, handle: SessionRequest) -> None:
        self._loop = loop
        self._handle = handle
        self.request_id = handle.request_id

    def __iter__(self) -> Iterator[Event]:
        return self._loop.iterate(lambda: self._handle)

    def cancel(self) -> None:
        self._loop.loop.call_soon_threadsafe(self._handle.cancel)

    def result(self) -> Result:
        return self._loop.run(self._handle.result())
