"""The device side: play an exported policy with numpy and onnxruntime, never torch.

    policy    the ONNX policy's metadata schema; Policy loads and checks a model and acts
    play      the stream a policy plays, the check that it fits, the play loop
    manifest  published policies: signed entries, what a device accepted
    keys      what signs entries (Ed25519 or HMAC) and what a device trusts; key files
    sources   where published policies come from: a directory or an http(s) URL
    follow    Follower: plays the newest verified published policy, swaps between games

Each module raises its own one-line error (ModelError, ManifestError, KeyFileError,
SignatureError, SourceError, FollowError); the command lines (runtime.infer, runtime.keys)
import these modules and turn the errors into their exit codes, never the reverse. The
learner side (runtime.daemon) may import this package; this package never imports it.
"""
