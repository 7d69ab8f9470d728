"""The bias tier: group fairness metrics, text bias scores, counterfactual probes, monitoring."""

# The bases the Equal Credit Opportunity Act protects, in the order of the proto's ProtectedClass.
PROTECTED_CLASSES = (
    "race",
    "color",
    "religion",
    "national_origin",
    "sex",
    "marital_status",
    "age",
    "public_assistance",
)
