"""TLS over a Trio socket stream, driving `ssl.SSLObject` through memory BIOs.

What trio.SSLStream does, without what a relay pays for on every frame: its locks and
conflict detectors, its retry loop, and send_all's trip through the scheduler. A write is
encrypted and handed to the kernel at once when the socket takes it whole; only what it does
not take waits for the socket. Errors are trio's: BrokenResourceError, its cause the
ssl.SSLError (or OSError) that broke the stream, as trio.SSLStream raises them.

Records the peer sends after the handshake (TLS 1.3 session tickets, key updates) are read
as they come; what the TLS layer must answer is sent at once by the task that read them. The
end of the stream, with or without close_notify, reads as b"" (as trio's https_compatible).
"""
from __future__ import annotations

import ssl

import trio

from switchd.sendnow import send_now

RECEIVE_BYTES = 256 * 1024


class TlsStream(trio.abc.Stream):
    def __init__(
        self, transport: trio.SocketStream, context: ssl.SSLContext, *, server_side: bool = False,
        server_hostname: str | None = None,
    ) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        self._fd = transport.socket.fileno()
        # Only one task writes to the transport at a time: the writer's, or the reader's owed record.
        self._sending = trio.StrictFIFOLock()
        self._closed = False

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._tls

    async def do_handshake(self) -> None:
        """The TLS handshake; raises BrokenResourceError (its cause the ssl error) when it fails."""
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise trio.BrokenResourceError("the peer closed the connection during the TLS handshake") \
                        from ssl.SSLEOFError("EOF during the handshake")
                continue
            except (ssl.SSLError, ValueError) as exc:
                await self._flush_quietly()  # the alert that tells the peer why
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            await self._flush()
            return

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        while True:
            try:
                data = self._tls.read(max_bytes or RECEIVE_BYTES)
            except ssl.SSLWantReadError:
                if self._outgoing.pending:
                    await self._flush()
                if not await self._fill():
                    return b""  # with or without close_notify, as for HTTPS (trio's https_compatible)
                continue
            except ssl.SSLZeroReturnError:  # the peer's close_notify
                return b""
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS failed: {exc}") from exc
            if self._outgoing.pending:  # a record the TLS layer owes the peer (a key update's answer)
                await self._flush()
            return data

    async def _fill(self) -> bool:
        """One read from the socket into the TLS layer; False at its end."""
        data = await self.transport.receive_some(RECEIVE_BYTES)
        if not data:
            return False
        self._incoming.write(data)
        return True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS failed: {exc}") from exc
        await self._flush()

    async def _flush(self) -> None:
        """Everything encrypted so far, to the kernel: at once when it takes it whole."""
        if self._sending.locked():
            await self._sending.acquire()
        else:
            self._sending.acquire_nowait()
        try:
            out = self._outgoing.read()
            if out:
                await send_now(self._fd, self.transport, out)
        except OSError as exc:  # os.write's; the transport's own come as BrokenResourceError
            raise trio.BrokenResourceError(f"write failed: {exc}") from exc
        finally:
            self._sending.release()

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Send close_notify if the connection is still up (without waiting for the peer's), then close."""
        if self._closed:
            await trio.sleep(0)  # noqa: ASYNC115 (a checkpoint, the public way)
            return
        self._closed = True
        try:
            if not self._sending.locked():  # never in the middle of another task's record
                try:
                    self._tls.unwrap()
                except (ssl.SSLError, ValueError):
                    pass
                with trio.move_on_after(1):
                    await self._flush_quietly()
        finally:
            self._fd = -1  # the kernel may give the number to another socket once it is closed
            await self.transport.aclose()
