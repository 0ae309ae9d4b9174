"""Serving with Triton Inference Server: the model repository, the server process, the clients.

- :mod:`oatui.serve.repository`: ``oatui export``, writing ``REPO/NAME/{config.pbtxt,1/model.py}``;
- :mod:`oatui.serve.triton_models`: the Python-backend models (policy, rm, ref) it writes;
- :mod:`oatui.serve.generation`: the token-by-token decode loop the policy model streams;
- :mod:`oatui.serve.server` and :mod:`oatui.serve.supervisor`: running tritonserver, detached or not;
- :mod:`oatui.serve.client`: ``ScoreClient``, ``RefLogprobClient``, ``ChatClient``, ``AsyncChatClient``.

``server`` and ``client`` import neither torch nor transformers: the UI uses them.
"""
