"""The billing service: the usage ledger, prices, budgets, alerts, reports and audit log."""
