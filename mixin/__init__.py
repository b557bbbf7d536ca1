"""kvcache-exporter's monitoring mixin: rules, alerts, routing and dashboards from one config."""
