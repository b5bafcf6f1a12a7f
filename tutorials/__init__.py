"""The tutorials: Markdown chapters whose ``python`` blocks run, in order, in one namespace each.

``python -m tutorials NAME`` runs one chapter in a terminal (``tutorials/__main__.py``), and
``tests/test_tutorials.py`` runs every chapter and compares what each block prints with the
``output`` block shown after it. Both read the chapters with ``tutorials/chapters.py``.
"""
