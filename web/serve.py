"""Serve the page and an exported folder from 127.0.0.1, cross-origin isolated so that WASM can use threads.

    python web/serve.py --model exported/web/int8 [--port 8000]

serves this folder at `/` and the export at `/model/` (the page's default; the page takes another with
`?model=model/SUBFOLDER/`, so the folder `--web` writes can be served whole). Threads in WASM need SharedArrayBuffer,
which browsers give only to cross-origin isolated pages: every response carries `Cross-Origin-Opener-Policy:
same-origin` and `Cross-Origin-Embedder-Policy: require-corp`. Any static server that sets these two headers serves
the page as well; without them it runs on one thread. Prints `Serving http://127.0.0.1:PORT/` once listening.
"""

import argparse
import functools
import os
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PAGE = Path(__file__).resolve().parent
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class IsolatedHandler(SimpleHTTPRequestHandler):
    """Static files with the cross-origin isolation headers; `/model/...` is read from the export folder."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript", ".wasm": "application/wasm"}

    def __init__(self, *args, model_dir: Path, **kwargs):
        self.model_dir = model_dir
        super().__init__(*args, **kwargs)

    def translate_path(self, path):
        prefix = "/model/"
        if path.startswith(prefix):
            relative = super().translate_path("/" + path[len(prefix):])
            return str(self.model_dir / os.path.relpath(relative, self.directory))
        return super().translate_path(path)

    def end_headers(self):
        for name, value in ISOLATION_HEADERS.items():
            self.send_header(name, value)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format, *args):
        pass  # one line per file is noise; errors still reach the page


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a folder written by `python -m modeling_minrnn.export`")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    model_dir = Path(args.model).resolve()
    if not any(model_dir.glob("minrnn_export.json")) and not any(model_dir.glob("*/minrnn_export.json")):
        parser.error(f"--model {args.model} holds no minrnn_export.json: pass a folder written by the export")
    if not (PAGE / "vendor").is_dir():
        parser.error(f"{PAGE / 'vendor'} is missing: run `npm ci && npm run build` in {PAGE} first")
    handler = functools.partial(IsolatedHandler, directory=str(PAGE), model_dir=model_dir)
    with ThreadingHTTPServer((args.host, args.port), handler) as server:
        print(f"Serving http://{args.host}:{server.server_address[1]}/", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
