"""Test helpers kpy ships for its own tests and for third-party backends.

``builders`` makes model values and Plans; ``fake_backend`` is an in-memory backend;
``conformance`` is the suite every backend's tests subclass; ``apiserver`` is a fake
Kubernetes API server; ``netns`` builds real network-namespace topologies.
"""
