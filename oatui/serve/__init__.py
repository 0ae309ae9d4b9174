"""Serving with Triton Inference Server: the model repository, the server process, the clients.

- :mod:`oatui.serve.repository`: ``oatui export``, writing ``REPO/NAME/{config.pbtxt,1/model.py}``;
- :mod:`oatui.serve.triton_models`: the Python-backend models (policy, rm, ref) it writes;
- :mod:`oatui.serve.generation`: the token-by-token decode loop the policy model streams;
- :mod:`oatui.serve.server` and :mod:`oatui.serve.supervisor`: running tritonserver, detached or not,
  from :mod:`oatui.serve.binary` (which binary, its environment and argv), :mod:`oatui.serve.ports`
  (addresses, ports, the admin key), :mod:`oatui.serve.readiness`, :mod:`oatui.serve.shm`, and
  :mod:`oatui.serve.record` (``ServerOptions``, ``ServerInfo`` and ``server.json``);
- :mod:`oatui.serve.client`: ``ScoreClient``, ``RefLogprobClient``, ``ChatClient``, ``AsyncChatClient``.

``server`` (and the modules it uses) and ``client`` import neither torch nor transformers: the UI uses them.
"""
