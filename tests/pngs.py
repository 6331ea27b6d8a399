"""PNG files built chunk by chunk, for headers that claim more than the file holds."""
import struct
import zlib


def png_claiming(width: int, height: int, colour_type: int = 2, bit_depth: int = 8,
                 idat: bytes | None = None) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (colour type 0 grey, 2 RGB), with one IDAT
    chunk holding ``idat`` (zlib-compressed rows) or, when None, no pixel data at all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))
    pixels = b"" if idat is None else chunk(b"IDAT", idat)
    return b"\x89PNG\r\n\x1a\n" + header + pixels + chunk(b"IEND", b"")
