"""Memory: the virtualized, paged KV pool shared by every model.

In: model shapes and a physical page budget. Out: per-model K/V tensors (views of virtual
ranges) plus block allocation that maps physical pages in and out of those ranges on demand.
"""
