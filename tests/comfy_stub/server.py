"""``from server import PromptServer``: a stand-in whose ``PromptServer.instance`` records messages.

ComfyUI's ``send_progress_text(text, node_id, sid=None)`` utf-8 encodes ``text``, packs
``struct.pack(">I", len(node_id_bytes)) + node_id_bytes + text`` and sends it as binary event 3
(BinaryEventTypes.TEXT) via ``send_sync``. The stub does the same packing and also records the call.
"""
import struct


class BinaryEventTypes:
    PREVIEW_IMAGE = 1
    UNENCODED_PREVIEW_IMAGE = 2
    TEXT = 3


class PromptServer:
    instance = None

    def __init__(self):
        PromptServer.instance = self
        self.progress_texts = []  # (text, node_id, sid) exactly as passed
        self.messages = []        # (event, data, sid) given to send_sync

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data, sid))

    def send_progress_text(self, text, node_id, sid=None):
        self.progress_texts.append((text, node_id, sid))
        raw = text.encode("utf-8") if isinstance(text, str) else text
        node = str(node_id).encode("utf-8")
        self.send_sync(BinaryEventTypes.TEXT, struct.pack(">I", len(node)) + node + raw, sid)

    def reset(self):
        self.progress_texts.clear()
        self.messages.clear()


PromptServer()
