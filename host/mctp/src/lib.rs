//! Sans-IO MCTP: the reliable multicast transport a group leader uses to hand an assignment to the members of its segment. No sockets, no clocks, no tokio.
