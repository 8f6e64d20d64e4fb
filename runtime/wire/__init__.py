"""The wire between the aggregator and the devices, in one subpackage.

``codec`` turns a model or an update into bytes and back (format, encode,
decode, bounded inflate); ``checks`` holds the checks of an update's tensors,
run once where it is decoded; ``protocol`` is the MQTT protocol (topics, SFCK
chunks, JSON control messages); ``broker`` connects to the broker (settings,
TLS, a paho client). Both sides (trainer/ and server/) import these, and
nothing here imports trainer/, server/ or tools/.
"""

from .broker import BrokerSettings, QueuedClient
from .checks import CheckedTensors, finite_problem, tensors_problem
from .codec import (
    ENCODINGS,
    Encoding,
    Message,
    decode,
    encode,
    encoded_size,
    max_encoded_size,
    model_spec,
)
from .protocol import ProtocolError, Topics

__all__ = [
    "ENCODINGS", "BrokerSettings", "CheckedTensors", "Encoding", "Message",
    "ProtocolError", "QueuedClient", "Topics", "decode", "encode", "encoded_size",
    "finite_problem", "max_encoded_size", "model_spec", "tensors_problem",
]
