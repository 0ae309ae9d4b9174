"""The Python-backend models that ``oatui export`` copies into a repository as ``NAME/1/model.py``.

Each file defines ``TritonPythonModel`` and imports ``triton_python_backend_utils``, which exists
only inside the Triton Python backend stub; the shared, stub-free helpers live in ``common``.
"""
