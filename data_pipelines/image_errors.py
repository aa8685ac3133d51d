"""The error of an image that cannot be used, shared by the decoders (`images`, `tiff`).

Its own module so that `images` may load the TIFF decoder and the TIFF decoder may raise it
without the two importing each other.
"""


class BadImage(ValueError):
    """An image file that cannot be used; the message is a short reason."""
