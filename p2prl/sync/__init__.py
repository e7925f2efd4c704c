"""How the peers share an update: the learner, its optimizers and the sync strategies.

learner.py (`Learner.step(loss, terms)`: one update, identical on every peer), optim.py (Adam, RMSprop
and SGD on one flat parameter), bucket.py (the flat gradient bucket), base.py (the Strategy base class)
with allreduce.py, param_server.py, local_sgd.py (with DiLoCo's outer step), gossip.py (how an update
is shared), compress.py (how a sum's network hop travels, `comm.compress`: the forms' table; compression.py
their base and error feedback; int8.py, lowrank.py), and table.py (the one table of strategies behind
`comm=`). It talks to the other peers only through the Communicator interface
(`p2prl.comm`), never through torch.distributed.
"""
