"""The sparse machinery, one module per idea: the CSR type (csr), the static
pattern a pruned layer keeps between steps (static_pattern), magnitude pruning
(pruning), the activation policy of each method (activation_policy) and SWAT's
kept activations (activations).

Nothing is imported here, so that the layers can use these modules and pruning
can use the layers without an import cycle.
"""
