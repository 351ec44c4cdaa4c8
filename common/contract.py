"""The names fedge's two sides agree on, each written once (docs/CONTRACTS.md).

The coordinator (strategy wrapper, downlink compressor, gRPC service) and the
device (compression mod, downlink cache, edge session) are separate programs,
often of different fedge versions, that meet only in Flower messages and
fedge's gRPC envelopes. Every key, format name and version both must spell
the same lives here, so a rename is one edit and a typo is an import error,
not a silently ignored config entry.
"""

from __future__ import annotations

# ---------------------------------------------------------------- gRPC envelopes

#: `JoinRequest/JoinReply.protocol_version`: the coordinator protocol both ends speak
PROTOCOL_VERSION = 1
#: `payload_format` of a task or result envelope: a whole Flower `Message` in
#: Flower's own protobuf form (`fedge.common.flower_compat.message_to_bytes`)
FLOWER_MESSAGE_FORMAT = "flwr.proto.Message"
#: `payload_format` of a FetchModel header: a `fedge.v1.ModelSnapshot` (`fedge.common.snapshot`)
MODEL_SNAPSHOT_FORMAT = "fedge.v1.ModelSnapshot"

# ---------------------------------------------------------------- the HTTP API

#: the HTTP API's enrollment route (server/http_enroll.py serves it, client/enroll.py posts)
ENROLL_HTTP_PATH = "/v1/enroll"
#: the media type of protobuf bodies on the HTTP API (model files, enrollment)
PROTOBUF_MEDIA_TYPE = "application/x-protobuf"

# ---------------------------------------------------------------- train config keys
# Entries fedge adds to the train message's ConfigRecord ("config"), next to
# Flower's own (`server-round`) and the task's hyperparameters.

#: codec spec the device encodes its reply with (absent or "none": full weights)
CODEC_KEY = "fedge.codec"
#: `fedge.common.model_version` of the global model sent; a delta is taken against it
BASE_VERSION_KEY = "fedge.base-version"
#: the coordinator's run id, echoed in the encoded update
RUN_ID_KEY = "fedge.run-id"
#: True when the device must start without its error-feedback residual (a new base model)
RESET_RESIDUAL_KEY = "fedge.reset-residual"

#: the downlink codec in force (absent or "none": plain downlink)
DOWNLINK_CODEC_KEY = "fedge.downlink-codec"
#: version of the anchor (the full model the device holds and a delta is against)
DOWNLINK_ANCHOR_KEY = "fedge.downlink-anchor"
#: (deltas only) version of the model the device must rebuild
DOWNLINK_TARGET_KEY = "fedge.downlink-target"
#: the anchor every device holds without being sent anything: the all-zero model. A delta
#: against it is the whole model, quantized (a compressed first contact)
ZERO_ANCHOR = "zero"

# ---------------------------------------------------------------- record keys

#: the only key of a compressed reply's ArrayRecord (`fedge.common.update_array`)
UPDATE_KEY = "fedge.update"
#: `Array.stype` of a packed update: the protobuf message its bytes hold
UPDATE_STYPE = "fedge.v1.ModelUpdate"
#: the single array of a compressed downlink's ArrayRecord (packed like `UPDATE_KEY`)
DOWNLINK_ARRAY_KEY = "fedge.downlink"
#: ConfigRecord a device adds to its train reply, and its key naming the anchor it holds
DOWNLINK_REPLY_KEY = "fedge.downlink"
DOWNLINK_HELD_KEY = "held-version"

# ---------------------------------------------------------------- context.state keys
# Records kept between rounds in a ClientApp's or ServerApp's `context.state`;
# on a device they are saved with the context, so they outlive a restart.

#: device: the error-feedback residual (ArrayRecord, one tensor per model tensor)
RESIDUAL_STATE_KEY = "fedge.residual"
#: device: the downlink anchor (ArrayRecord: the full model deltas are taken against)
ANCHOR_STATE_KEY = "fedge.downlink-anchor"
#: device: the anchor's and the last rebuilt model's versions (ConfigRecord)
ANCHOR_META_STATE_KEY = "fedge.downlink"
#: ServerApp: the run's report (ConfigRecord: `rounds`, `initial-loss`, `initial-accuracy`)
REPORT_STATE_KEY = "fedge.report"
#: ServerApp: the final global model (ArrayRecord)
FINAL_ARRAYS_STATE_KEY = "fedge.final-arrays"

# ---------------------------------------------------------------- differential privacy
# (docs/privacy.md) The coordinator names the clipping norm in every train config; a fedge
# device clips what it sends (update plus error-feedback residual) to it and reports, in a
# reply ConfigRecord, whether its unclipped norm was within it (adaptive clipping's bit).

#: train config: the L2 norm C the device clips its update to (absent: no DP clipping)
DP_CLIP_KEY = "fedge.dp-clip"
#: ConfigRecord a device adds to its train reply under DP, and its key: norm <= C (bool)
DP_REPLY_KEY = "fedge.dp"
DP_BELOW_CLIP_KEY = "below-clip"
#: device: its personal part (ArrayRecord: the head fitted to its own data), never sent
PERSONAL_STATE_KEY = "fedge.personal"

# ---------------------------------------------------------------- personal models

#: run-config `personalize`: what a device fits to its own data (common/personal.py)
PERSONAL_MODES = ("none", "head", "full")
#: node-config key: the file a device writes its personal part to (its folder's
#: `personal-head.npz`, which `fedge predict` reads next to the model file)
PERSONAL_PATH_KEY = "personal-path"
#: its name in the device folder, next to the model file `fedge predict` reads
PERSONAL_FILE_NAME = "personal-head.npz"
