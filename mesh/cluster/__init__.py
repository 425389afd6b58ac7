"""Zero-config home cluster: discovery, membership, failure detection, coordinator election.

Sans-IO cores (no sockets, no clocks): `election.Election`, `detector.FailureDetector`,
`fence.Fence`, `bootstrap.Bootstrap`, `discovery.parse_txt`. Thin asyncio adapters: `discovery.MdnsDiscovery`
and `service.ClusterService`.
"""
