"""llama-cpp-python's OpenAI server as ``bench_serve.py`` runs it: no extra buffer types.

    python benches/llama_server.py --model MODEL.gguf --port 8001 --threads 2

The same server as ``python -m llama_cpp.server`` (``llama_cpp.server.app.create_app`` run by
uvicorn), with two differences: the model is loaded without llama.cpp's "extra buffer types"
(``bench_generate.disable_llama_extra_bufts``: the AMX repack dies with SIGILL on the bench
machine), and ``interrupt_requests`` is off, so that a new request waits for the one in progress
instead of cutting its stream short (the server default interrupts it). The server holds one
``Llama`` behind a lock and answers one request at a time; concurrent requests queue.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_generate import disable_llama_extra_bufts  # noqa: E402


def main() -> None:
    """Parse the flags, build the llama-cpp-python app and serve it on 127.0.0.1."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the .gguf file")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2, help="n_threads and n_threads_batch")
    ap.add_argument("--n-ctx", type=int, default=2048, help="context size (default 2048)")
    args = ap.parse_args()

    import llama_cpp
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    disable_llama_extra_bufts(llama_cpp)
    server = ServerSettings(host="127.0.0.1", port=args.port, interrupt_requests=False)
    model = ModelSettings(
        model=args.model,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=args.n_ctx,
        verbose=False,
    )
    app = create_app(server_settings=server, model_settings=[model])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
