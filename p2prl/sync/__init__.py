"""How the peers share an update: the learner, its optimizers and the sync strategies.

learner.py (`Learner.step(loss, terms)`: one update, identical on every peer), optim.py (Adam, RMSprop
and SGD on one flat parameter), bucket.py (the flat gradient bucket), base.py (the Strategy base class)
with allreduce.py, param_server.py, local_sgd.py (with DiLoCo's outer step), gossip.py (how an update
is shared), compress.py (how a gradient travels: comm.compress), and table.py (the one table of
strategies behind `comm=`). It talks to the other peers only through the Communicator interface
(`p2prl.comm`), never through torch.distributed.
"""
