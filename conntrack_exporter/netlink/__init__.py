"""The one place that speaks netlink: framing, the socket, and protocol decoders."""

from conntrack_exporter.netlink.core import NetlinkError, NetlinkParseError, NetlinkTimeout

__all__ = ["NetlinkError", "NetlinkParseError", "NetlinkTimeout"]
