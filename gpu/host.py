"""Host memory registration: pin an existing host buffer for DMA with cudaHostRegister, once.

Publishers pin the shared-memory buffers they pack into (fast device-to-host packing);
subscribers pin the host regions their GPU stage copies from (fast host-to-device pulls). Both
go through `HostRegistration`, the one seam where the CUDA runtime's return codes become a
typed `HostRegisterError`. Registering costs ~0.1-0.3 s per GiB: do it when a buffer is made or
mapped, never per version.
"""

from __future__ import annotations

import contextlib

import torch

from streamer.errors import StreamerError

__all__ = ["HostRegisterError", "HostRegistration"]

_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context
_HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly: the device only reads it


class HostRegisterError(StreamerError):
    """cudaHostRegister / cudaHostUnregister refused a host buffer."""


class HostRegistration:
    """Pin an existing host buffer with cudaHostRegister, once; `close()` unregisters it.

    The registration is portable: every CUDA context of the process may DMA from it. With
    `read_only=True` the pages are pinned for reading only, which is what a copy-on-write
    (private) mapping of another process's memory needs: pinning it writable would give this
    process private copies of the pages, which the owner's later writes never reach.

    >>> region = host_tensor(mmap.mmap(fd, nbytes))  # doctest: +SKIP
    >>> with HostRegistration(region):  # doctest: +SKIP
    ...     stager.pull([region], buckets)
    """

    def __init__(self, host: torch.Tensor, *, read_only: bool = False) -> None:
        if host.device.type != "cpu" or not host.is_contiguous():
            raise ValueError("HostRegistration takes a contiguous CPU tensor")
        self.host = host
        self.nbytes = host.numel() * host.element_size()
        self._ptr = host.data_ptr()
        self._registered = False
        if self.nbytes:
            cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
            flags = _HOST_REGISTER_PORTABLE | (_HOST_REGISTER_READ_ONLY if read_only else 0)
            result = cudart.cudaHostRegister(self._ptr, self.nbytes, flags)
            if int(result):
                message = cudart.cudaGetErrorString(result)
                _consume_last_error()
                raise HostRegisterError(
                    f"cudaHostRegister of {self.nbytes} bytes at {self._ptr:#x} failed with error "
                    f"{int(result)}: {message}"
                )
            self._registered = True

    @property
    def address(self) -> int:
        return self._ptr

    def close(self) -> None:
        if not self._registered:
            return
        self._registered = False
        code = int(torch.cuda.cudart().cudaHostUnregister(self._ptr))  # type: ignore[no-untyped-call]
        if code:
            _consume_last_error()
            raise HostRegisterError(
                f"cudaHostUnregister at {self._ptr:#x} failed with error {code}"
            )

    def __enter__(self) -> HostRegistration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _consume_last_error() -> None:
    """Take a failed runtime call's error off the CUDA runtime, where it would stay.

    A failed cudaHostRegister also sets the runtime's last error, and torch checks that after
    its next kernel launch: some unrelated tensor operation would raise it. torch exposes no
    cudaGetLastError, so a tiny launch takes the error (and raises it) here instead.
    """
    with contextlib.suppress(RuntimeError):  # torch.AcceleratorError is a RuntimeError
        torch.zeros(1, device="cuda").add_(1)
